"""Scale out and never lose a run: 2 gloo processes under torchrun against 1 process, gradient accumulation
against the whole batch, kill -9 and --resume against an uninterrupted run, and the EMA weights."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from onestep_lm.cli import main
from onestep_lm.config import load_config
from onestep_lm.nn.noise import BatchNoise
from onestep_lm.runs import open_run, train_run
from onestep_lm.train.checkpoint import list_checkpoints, verify_checkpoint

from conftest import TINY

QUICK = ["--no-progress", "--set", "train.log_every=1", "--set", "train.eval_batches=1"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli_proc(*args, torchrun: int = 0) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] \
        if torchrun else [sys.executable]
    return subprocess.Popen([*launcher, "-m", "onestep_lm", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    return out, err


def losses(run_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def final_weights(run_dir, name="model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1] / name))


def test_two_gloo_processes_match_one_process(tmp_path):
    """The same global batch and noise on 1 and 2 processes: the flow's losses agree to 1e-4 (the noise of u
    ~ q(.|x) is a function of the global sample index), and only rank 0 writes or prints."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", "flow", "--config", TINY, "--max-steps", 8, "--checkpoint-every", 4, *QUICK]
    p2 = cli_proc(*args, "--out", two, torchrun=2)
    p1 = cli_proc(*args, "--out", one)
    out2, err2 = finish(p2)
    finish(p1)
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, 9))
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-4, (step, l1[step], l2[step])
    w1, w2 = final_weights(one), final_weights(two)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3)
    # rank 0 alone writes: one line per step in the log, one summary on stdout, one parameter line
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in map(json.loads, lines) if "loss" in r]) == 8
    assert [json.loads(line)["processes"] for line in out2.splitlines() if line.startswith("{")] == [2]
    assert err2.count("trainable parameters") == 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [p.name for p in list_checkpoints(two)] == ["step_00000004", "step_00000008"]
    assert json.loads((two / "train_summary.json").read_text())["processes"] == 2


@pytest.mark.parametrize("kind", ["flow", "mdlm"])
def test_gradient_accumulation_takes_the_same_steps(tmp_path, kind):
    """micro_batch_size 4 of a batch of 16 (4 micro-batches, accumulated) trains like the whole batch at once:
    the losses are per-token means and the models' noise is drawn per global sample index."""
    cfg = load_config(TINY, ["train.max_steps=5", "train.log_every=1", "train.eval_batches=1"])
    whole = train_run(kind, cfg, tmp_path / "whole", progress=False)
    cfg = load_config(TINY, ["train.max_steps=5", "train.log_every=1", "train.eval_batches=1",
                             "train.micro_batch_size=4"])
    micro = train_run(kind, cfg, tmp_path / "micro", progress=False)
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "micro")
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert abs(whole["val_loss"] - micro["val_loss"]) < 1e-4


def test_batch_noise_depends_on_the_global_index_only():
    whole = BatchNoise(7, 0, 8)
    parts = [BatchNoise(7, start, 8) for start in (0, 2, 4, 6)]
    assert torch.equal(torch.cat([p.randn(2, 3, 4) for p in parts]), whole.randn(8, 3, 4))
    assert torch.equal(torch.cat([p.rand(2, 5) for p in parts]), whole.rand(8, 5))
    with pytest.raises(ValueError):
        BatchNoise(7, 6, 8).randn(4, 2)


def test_kill_9_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    """SIGKILL mid-run, damage the newest checkpoint for good measure, --resume: the run skips the damaged
    checkpoint with a warning naming it, finishes at the same step with the same loss trajectory, final loss,
    weights and EMA as a run that never stopped."""
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    steps, every = 240, 10
    args = ["train", "flow", "--config", TINY, "--max-steps", steps, "--checkpoint-every", every,
            "--set", "train.ema=0.99", *QUICK]
    p_ref = cli_proc(*args, "--out", ref)
    p_victim = cli_proc(*args, "--out", victim)
    deadline = time.time() + 180
    while len(list_checkpoints(victim)) < 3:  # let it write a few checkpoints, then kill it mid-run
        assert p_victim.poll() is None, "the run ended before it could be killed:\n" + p_victim.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.02)
    p_victim.send_signal(signal.SIGKILL)
    p_victim.communicate()
    assert p_victim.returncode == -signal.SIGKILL
    assert not (victim / "train_summary.json").exists()
    newest = list_checkpoints(victim)[-1]
    assert verify_checkpoint(newest) is None  # complete (atomic), though the process died at any moment
    killed_at = int(newest.name.split("_")[1])
    assert killed_at < steps
    blob = bytearray((newest / "state.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, different bytes: only the hash can tell
    (newest / "state.pt").write_bytes(bytes(blob))

    resumed = cli_proc("train", "flow", "--out", victim, "--resume", "--max-steps", steps, "--checkpoint-every",
                       every, "--no-progress")
    _, err = finish(resumed)
    finish(p_ref)
    warning = [line for line in err.splitlines() if "damaged checkpoint" in line]
    assert len(warning) == 1 and str(newest) in warning[0] and "sha256" in warning[0], err

    a = json.loads((ref / "train_summary.json").read_text())
    b = json.loads((victim / "train_summary.json").read_text())
    assert a["step"] == b["step"] == steps
    assert abs(a["loss"] - b["loss"]) < 1e-6
    assert losses(ref) == pytest.approx(losses(victim), abs=1e-6)  # the whole trajectory,
    assert len((victim / "metrics.jsonl").read_text().splitlines()) == steps + 1  # logged once per step
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = final_weights(ref, name), final_weights(victim, name)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-6)


def test_ema_weights_are_checkpointed_verified_and_used_for_evaluation(tmp_path, capsys):
    out = tmp_path / "ar"
    assert main(["train", "ar", "--config", str(TINY), "--out", str(out), "--max-steps", "6", "--set",
                 "train.ema=0.9", *QUICK]) == 0
    ckpt = list_checkpoints(out)[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "state.pt", "ema.safetensors"}
    ema, raw = open_run(out), open_run(out, ema=False)
    ema_w, raw_w = ema.model.state_dict(), raw.model.state_dict()
    assert not all(torch.equal(ema_w[k], raw_w[k]) for k in raw_w)  # the averaged weights, not the raw ones
    assert all(torch.equal(ema_w[k], v) for k, v in load_file(str(ckpt / "ema.safetensors")).items())
    # the EMA file is covered by the integrity check
    blob = bytearray((ckpt / "ema.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (ckpt / "ema.safetensors").write_bytes(bytes(blob))
    assert "ema.safetensors" in verify_checkpoint(ckpt)
