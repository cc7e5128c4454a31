"""Clear errors, nothing lost: every bad input gets one line naming the problem (no traceback), a non-zero exit,
and leaves the files that were there byte-identical. Most cases call the CLI's `main` in-process (the same code
path as the command, without the start-up cost); the run-folder and checkpoint cases also run the real command."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import onestep_lm
from onestep_lm.cli import main
from onestep_lm.errors import DataError
from onestep_lm.models.flow_lm import FlowLM
from onestep_lm.train.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint, verify_checkpoint

from conftest import TINY

QUICK = ["--no-progress", "--set", "train.eval_batches=1", "--set", "train.log_every=1"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(capsys, *args) -> str:
    """Run the CLI in-process; it must fail with status 2 and one line on stderr, which is returned."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("onestep-lm: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def command(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "onestep_lm", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def one_line_failure(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onestep-lm: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("robust") / "flow"
    assert main(["train", "flow", "--config", str(TINY), "--out", str(out), "--max-steps", "6",
                 "--checkpoint-every", "3", *QUICK]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003", "step_00000006"]
    return out


# ---- data files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, words", [
    (b"", "is empty"),
    (b"hello\x00\x01\x02 world" * 20, "binary"),
    ("caf\u00e9 ".encode("latin-1") * 50, "not valid UTF-8"),
    (b"abab" * 7, "fewer than one window"),  # 28 characters: a training split shorter than seq_len=32
])
def test_bad_data_files(tmp_path, capsys, content, words):
    data = tmp_path / "corpus.txt"
    data.write_bytes(content)
    out = tmp_path / "run"
    line = fails(capsys, "train", "flow", "--config", TINY, "--data", data, "--out", out, "--max-steps", 2, *QUICK)
    assert words in line and ("corpus.txt" in line or words == "fewer than one window"), line
    assert data.read_bytes() == content and not out.exists()


# ---- configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (["train.bogus=1"], ["'train.bogus'", "allowed keys", "batch_size", "ema"]),
    (["model.flow.widht=3"], ["'model.flow.widht'", "allowed keys", "width"]),
    (["train.batch_size=many"], ["train.batch_size", "'many'", "integer"]),
    (["data.tokenizer=words"], ["data.tokenizer", "'words'", "char, bpe, gpt2"]),
    (["train.ema=2"], ["train.ema", "(0, 1)"]),
    (["train.batch_size=15", "train.micro_batch_size=4"], ["train.micro_batch_size", "4", "15"]),
])
def test_bad_config_keys_name_the_key_and_the_allowed_values(tmp_path, capsys, overrides, words):
    out = tmp_path / "run"
    sets = [arg for item in overrides for arg in ("--set", item)]
    line = fails(capsys, "train", "ar", "--config", TINY, "--out", out, *sets, *QUICK)
    for w in words:
        assert w in line, (w, line)
    assert not out.exists()


def test_unknown_key_in_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    text = TINY.read_text().replace("train:\n", "train:\n  learning_rate: 0.1\n")
    cfg.write_text(text)
    line = fails(capsys, "train", "flow", "--config", cfg, "--out", tmp_path / "run")
    assert "'train.learning_rate'" in line and "lr" in line and "warmup_steps" in line
    assert cfg.read_text() == text


# ---- run folders and checkpoints ----------------------------------------------------------------------------
def test_existing_run_is_refused_without_resume(flow_run):
    before = snapshot(flow_run)
    proc = command("train", "flow", "--config", TINY, "--out", flow_run, "--max-steps", 2, "--no-progress")
    line = one_line_failure(proc)
    assert str(flow_run) in line and "--resume" in line
    assert snapshot(flow_run) == before


def test_resume_of_a_folder_that_is_no_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    line = fails(capsys, "train", "flow", "--out", tmp_path, "--resume", *QUICK)
    assert "not a run folder" in line and (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_and_damaged_checkpoints(flow_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(flow_run, run)
    newest, older = list_checkpoints(run)[-1], list_checkpoints(run)[0]
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:-10])  # cut short
    before = snapshot(run)
    proc = command("sample", "--run", run, "-n", 1)  # the older, valid checkpoint is used, with a warning
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "damaged checkpoint" in line]
    assert len(warning) == 1 and str(newest) in warning[0] and "bytes" in warning[0], proc.stderr

    (older / "state.pt").unlink()  # now every checkpoint is damaged
    proc = command("eval", "--run", run, "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("onestep-lm: error")]
    assert len(errors) == 1 and "no valid checkpoint" in errors[0] and "2 found, all damaged" in errors[0]
    assert str(older) in proc.stderr and str(newest) in proc.stderr  # each named by its warning
    before.pop(str(older.relative_to(run) / "state.pt"))
    assert snapshot(run) == before

    shutil.rmtree(run / "checkpoints")  # missing altogether
    proc = command("eval", "--run", run, "--no-progress")
    assert "no valid checkpoint" in one_line_failure(proc)


def test_resume_refuses_to_start_over_on_damaged_checkpoints(flow_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(flow_run, run)
    for ckpt in list_checkpoints(run):
        (ckpt / "meta.json").write_text("{not json")
    before = snapshot(run)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step_0000000[36]"):
        line = fails(capsys, "train", "flow", "--out", run, "--resume", "--max-steps", 8, *QUICK)
    assert "all 2 checkpoints" in line and "damaged" in line
    assert snapshot(run) == before


def test_partial_and_interrupted_checkpoint_writes(tmp_path):
    w = {"a": torch.arange(6.0)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, w, {"step": step}, keep_last=5)
    root = tmp_path / "checkpoints"
    (root / "step_00000003" / "meta.json").unlink()  # a partial checkpoint (e.g. copied by hand, half-way)
    shutil.copytree(root / "step_00000002", root / ".tmp_step_00000004_99")  # a writer killed mid-write
    (root / "step_00000002" / "state.pt").write_bytes(b"x" * (root / "step_00000002" / "state.pt").stat().st_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_checkpoint(tmp_path) == root / "step_00000001"
    messages = [str(c.message) for c in caught]
    assert any("step_00000003" in m and "meta.json" in m for m in messages), messages
    assert any("step_00000002" in m and "sha256" in m for m in messages), messages
    # a writer killed between moving the old copy of a step aside and moving the new one in
    os.replace(root / "step_00000001", root / ".old_step_00000001_42")
    save_checkpoint(tmp_path, 5, w, {"step": 5}, keep_last=5)
    assert verify_checkpoint(root / "step_00000001") is None and not list(root.glob(".*"))


# ---- models and texts ---------------------------------------------------------------------------------------
def test_generator_refuses_a_flow_whose_weights_changed(flow_run, tmp_path, capsys):
    flow = tmp_path / "flow"
    shutil.copytree(flow_run, flow)
    gen = tmp_path / "gen"
    assert main(["train", "generator", "--config", str(TINY), "--flow", str(flow), "--out", str(gen),
                 "--max-steps", "2", *QUICK]) == 0
    capsys.readouterr()
    assert main(["train", "flow", "--out", str(flow), "--resume", "--max-steps", "8", *QUICK]) == 0  # new weights
    capsys.readouterr()
    before = snapshot(gen)
    line = fails(capsys, "sample", "--run", gen, "-n", 1)
    assert "refusing to pair" in line and str(flow) in line
    assert snapshot(gen) == before
    line = fails(capsys, "train", "generator", "--config", TINY, "--out", tmp_path / "gen2", *QUICK)
    assert "--flow" in line and not (tmp_path / "gen2").exists()


def test_text_outside_the_vocabulary(flow_run):
    m = onestep_lm.load(flow_run)
    for call in (m.encode, m.log_likelihood):
        with pytest.raises(DataError) as e:
            call(["To be", "caf\u00e9 \u2603"])
        assert "text 1" in str(e.value) and "'\u00e9'" in str(e.value) and "\n" not in str(e.value)
    assert len(m.log_likelihood("To be")) == 1  # the model still works after the error


# ---- non-finite losses --------------------------------------------------------------------------------------
def nan_on_calls(monkeypatch, bad):
    original = FlowLM.loss
    calls = {"n": 0}

    def loss(self, x, noise=None):
        value, metrics = original(self, x, noise=noise)
        calls["n"] += 1
        return (value * float("nan"), metrics) if bad(calls["n"]) else (value, metrics)

    monkeypatch.setattr(FlowLM, "loss", loss)
    monkeypatch.setattr(FlowLM, "forward", loss)


def test_nonfinite_losses_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    nan_on_calls(monkeypatch, lambda n: n in (3, 4))
    out = tmp_path / "run"
    assert main(["train", "flow", "--config", str(TINY), "--out", str(out), "--max-steps", "6", *QUICK]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["step"] == 6 and summary["nonfinite"] == 2
    assert all(torch.isfinite(v).all() for v in onestep_lm.load(out).model.state_dict().values())


def test_a_run_of_nonfinite_losses_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    nan_on_calls(monkeypatch, lambda n: n > 5)
    out = tmp_path / "run"
    line = fails(capsys, "train", "flow", "--config", TINY, "--out", out, "--max-steps", 20, "--checkpoint-every",
                 2, "--set", "train.max_nonfinite=3", *QUICK)
    assert "3 non-finite losses in a row at step 5" in line and "step_00000004" in line
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002", "step_00000004"]
    assert verify_checkpoint(list_checkpoints(out)[-1]) is None
    assert not (out / "train_summary.json").exists()


def test_a_diverging_learning_rate_ends_with_one_line(tmp_path, capsys):
    line = fails(capsys, "train", "flow", "--config", TINY, "--out", tmp_path / "run", "--max-steps", 30,
                 "--set", "train.lr=1e30", "--set", "train.warmup_steps=0", "--set", "train.max_nonfinite=3",
                 *QUICK)
    assert "non-finite" in line and "train.lr" in line
