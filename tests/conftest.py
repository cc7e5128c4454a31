"""Shared fixtures: a tokenized-data cache private to the test session, and tiny trained runs reused by tests."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP threads spinning against
    other processes slow them down a hundredfold."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    old = os.environ.get("ONESTEP_LM_CACHE")
    os.environ["ONESTEP_LM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("ONESTEP_LM_CACHE", None)
    else:
        os.environ["ONESTEP_LM_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, private_cache):
    """`onestep-lm run` on configs/tiny.yaml, shortened: a flow run, a generator run, a judge and a report."""
    from onestep_lm.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("pipeline") / "demo"
    run_pipeline(TINY, out, overrides=["train.max_steps=80", "train.judge={max_steps: 40}"], progress=False,
                 n_samples=3, judged_samples=8)
    return out


def _tiny_run(tmp_path_factory, kind: str, steps: int = 60):
    from onestep_lm.config import load_config
    from onestep_lm.runs import train_run

    out = tmp_path_factory.mktemp(f"tiny_{kind}") / kind
    train_run(kind, load_config(TINY, [f"train.max_steps={steps}"]), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_ar(tmp_path_factory, private_cache):
    """A tiny AR run folder (configs/tiny.yaml, 60 steps)."""
    return _tiny_run(tmp_path_factory, "ar")


@pytest.fixture(scope="session")
def tiny_mdlm(tmp_path_factory, private_cache):
    """A tiny MDLM run folder (configs/tiny.yaml, 60 steps)."""
    return _tiny_run(tmp_path_factory, "mdlm")
