"""`onestep-lm run`: the main job writes every file of its report, and never overwrites a folder."""

import json

import pytest

from onestep_lm.errors import RunError
from onestep_lm.pipeline import run_pipeline

from conftest import TINY


def test_run_writes_every_file_of_the_report(tiny_pipeline):
    for name in ("report.md", "results.json", "training_curves.png", "latent_histogram.png",
                 "agreement_by_position.png", "config.yaml"):
        path = tiny_pipeline / name
        assert path.is_file() and path.stat().st_size > 0, name
    results = json.loads((tiny_pipeline / "results.json").read_text())
    gen = results["generator"]
    assert 0 <= gen["teacher_agreement"] <= 1 and 0 <= gen["reconstruction_accuracy"] <= 1
    assert len(gen["teacher_agreement_by_position"]) == 32
    assert results["flow"]["val"]["bound"] is True
    assert set(results["samples"]) >= {"flow-inverse", "onestep (temperature 0)"}
    report = (tiny_pipeline / "report.md").read_text()
    assert "<=" in report and "teacher agreement" in report and "![" in report


def test_run_trains_a_judge_and_writes_the_comparison(tiny_pipeline):
    judge = json.loads((tiny_pipeline / "judge" / "train_summary.json").read_text())
    assert judge["step"] == 40  # train.judge's override, on top of train.ar's
    assert json.loads((tiny_pipeline / "judge" / "run.json").read_text())["kind"] == "ar"
    for name in ("report.md", "report.json", "quality_vs_time.png", "perplexity_vs_entropy.png"):
        assert (tiny_pipeline / "comparison" / name).stat().st_size > 0, name
    results = json.loads((tiny_pipeline / "results.json").read_text())
    settings = {(r["model"], r["setting"]) for r in results["comparison"]["rows"]}
    assert {("flow", "flow-inverse tau=1"), ("generator", "onestep T=0"), ("generator", "onestep T=1")} <= settings
    assert all(r["samples"]["n"] == 8 for r in results["comparison"]["rows"])
    assert "Samples under a judge" in (tiny_pipeline / "report.md").read_text()


def test_existing_output_folder_is_refused_and_left_alone(tiny_pipeline):
    before = {p: p.read_bytes() for p in tiny_pipeline.rglob("*") if p.is_file()}
    with pytest.raises(RunError, match="--resume"):
        run_pipeline(TINY, tiny_pipeline, progress=False)
    assert {p: p.read_bytes() for p in tiny_pipeline.rglob("*") if p.is_file()} == before


def test_resume_skips_finished_stages(tiny_pipeline):
    summary = (tiny_pipeline / "flow" / "train_summary.json").read_bytes()
    run_pipeline(TINY, tiny_pipeline, resume=True, overrides=["train.max_steps=80"], progress=False, n_samples=2)
    assert (tiny_pipeline / "flow" / "train_summary.json").read_bytes() == summary
