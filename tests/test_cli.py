"""The command line end to end on configs/tiny.yaml, and the run folder it leaves behind."""

import json
import os
import subprocess
import sys

import pytest
import torch

import onestep_lm
from onestep_lm.evaluation.likelihood import evaluate_likelihood
from onestep_lm.runs import open_run

from conftest import TINY


def cli(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "onestep_lm", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "flow"
    cli("train", "flow", "--config", TINY, "--out", out, "--max-steps", 60, "--no-progress")
    return out


def test_train_writes_a_complete_run_folder(flow_run):
    for name in ("run.json", "config.yaml", "tokenizer.json", "metrics.jsonl", "train_summary.json"):
        assert (flow_run / name).is_file(), name
    meta = json.loads((flow_run / "run.json").read_text())
    assert meta["kind"] == "flow" and meta["parameters"] > 0 and meta["vocab_size"] == 65
    assert json.loads((flow_run / "train_summary.json").read_text())["step"] == 60


def test_eval_writes_eval_json(flow_run):
    proc = cli("eval", "--run", flow_run, "--no-progress")
    assert "<=" in proc.stdout
    ev = json.loads((flow_run / "eval.json").read_text())
    for key in ("bits_per_token", "bits_per_char", "perplexity", "bound", "tokens", "terms_bits_per_token"):
        assert key in ev, key
    assert ev["bound"] is True and ev["tokens"] == 111_540  # every validation character, the tail included
    assert abs(ev["perplexity"] - 2 ** ev["bits_per_token"]) < 1e-6 * ev["perplexity"]


def test_sample_prints_n_texts_and_writes_jsonl(flow_run, tmp_path):
    proc = cli("sample", "--run", flow_run, "-n", 3, "--seed", 1, "--out", tmp_path / "s.jsonl")
    assert proc.stdout.count("--- sample") == 3
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["text"]) == 32 for r in rows)


def test_checkpoint_reloads_to_the_identical_evaluation(flow_run):
    a = evaluate_likelihood(open_run(flow_run), seed=3, progress=False)
    b = evaluate_likelihood(open_run(flow_run), seed=3, progress=False)
    assert a["bits_per_token"] == b["bits_per_token"]


def test_python_api_round_trip(flow_run):
    m = onestep_lm.load(flow_run)
    texts = ["First Citizen:\nBefore we proceed", "To be, or not to be"]
    assert m.decode(m.encode(texts)) == texts
    same = ["abcdefgh", "ABCDEFGH"]
    z = m.encode(same)
    assert isinstance(z, torch.Tensor) and z.shape == (2, 8, 4)
    assert m.decode(z) == same
    ll = m.log_likelihood(texts)
    assert len(ll) == 2 and all(v < 0 for v in ll)


def test_python_m_and_console_script_agree(flow_run):
    exe = os.path.join(os.path.dirname(sys.executable), "onestep-lm")
    if not os.path.exists(exe):
        pytest.skip("console script not installed")
    console = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    module = cli("--help").stdout
    assert console == module and "{train,eval,sample,run" in module
