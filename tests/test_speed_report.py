"""Speed benchmark and comparison report on tiny runs of every model: the analytic FLOP count equals what
PyTorch's FLOP counter sees, `bench speed` writes latency / throughput for every sampler and the matmul peak,
`report` writes the table and both plots."""

import json

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from onestep_lm.cli import main
from onestep_lm.evaluation.sample_eval import default_mdlm_steps, sampler_settings
from onestep_lm.evaluation.speed import flops_per_sample, matmul_peak
from onestep_lm.runs import open_run
from onestep_lm.sampling import sample_tokens

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_runs(tiny_pipeline, tiny_ar, tiny_mdlm):
    return {"flow": tiny_pipeline / "flow", "generator": tiny_pipeline / "generator", "ar": tiny_ar,
            "mdlm": tiny_mdlm}


def test_default_settings():
    assert default_mdlm_steps(64) == [1, 4, 16, 64] and default_mdlm_steps(32) == [1, 4, 16, 32]
    labels = [s.label for s in sampler_settings("generator", 32)]
    assert labels == ["onestep T=0", "onestep T=1", "flow-inverse tau=1"]
    assert [s.steps for s in sampler_settings("mdlm", 32, [1, 8, 100])] == [1, 8, 32]


def test_analytic_flops_equal_the_counted_matmul_flops(tiny_runs):
    """With the math attention backend every matmul, attention included, is an aten mm/bmm the counter sees."""
    for kind, path in tiny_runs.items():
        run = open_run(path)
        run.model.requires_grad_(False)
        for setting in sampler_settings(kind, 16, [1, 4]):
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                sample_tokens(run, 1, seed=0, seq_len=16, **setting.options())
            nfe = run.model.last_sample_nfe if setting.sampler == "mdlm" else None
            assert flops_per_sample(run, setting, 16, nfe) == counter.get_total_flops(), (kind, setting.label)


def test_matmul_peak_is_measured():
    peak = matmul_peak("cpu", size=128, repeats=2)
    assert peak["flops_per_s"] >= peak["median_flops_per_s"] > 0 and peak["dtype"] == "float32"


def test_bench_speed_writes_every_sampler(tiny_runs, tmp_path, capsys):
    out = tmp_path / "speed.json"
    runs = [str(tiny_runs[k]) for k in ("flow", "generator", "ar", "mdlm")]
    assert main(["bench", "speed", "--runs", *runs, "--batch", "1,4", "--rounds", "2", "--length", "16",
                 "--mdlm-steps", "1,4", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["matmul_peak"]["flops_per_s"] > 0 and result["length"] == 16 and result["batches"] == [1, 4]
    seen = {(s["kind"], s["setting"]) for s in result["settings"]}
    assert seen == {("flow", "flow-inverse tau=1"), ("generator", "onestep T=0"), ("generator", "onestep T=1"),
                    ("generator", "flow-inverse tau=1"), ("ar", "ar T=1"), ("mdlm", "mdlm steps=1 T=1"),
                    ("mdlm", "mdlm steps=4 T=1")}
    for s in result["settings"]:
        assert s["latency_s"] > 0 and s["throughput_seq_per_s"] > 0 and s["throughput_tokens_per_s"] > 0
        assert s["flops_per_sample"] > 0 and 0 < s["fraction_of_peak"]
        assert len(s["by_batch"]["1"]["times_s"]) == 2 and s["throughput_batch"] == 4
    assert set(result["ratios_vs_ar"]) == {s["label"] for s in result["settings"]}
    ar = next(s for s in result["settings"] if s["sampler"] == "ar")
    assert result["ratios_vs_ar"][ar["label"]]["latency_speedup"] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "matmul peak" in printed and "vs AR" in printed


def test_report_writes_table_and_both_plots(tiny_runs, tmp_path):
    out = tmp_path / "report"
    runs = [str(tiny_runs[k]) for k in ("flow", "generator", "ar", "mdlm")]
    assert main(["report", "--runs", *runs, "--judge", str(tiny_runs["ar"]), "--out", str(out), "--samples", "4",
                 "--seed", "5", "--sweep", "0.5,1", "--mdlm-steps", "1,4", "--batch", "1,2", "--rounds", "1",
                 "--no-progress"]) == 0
    for name in ("quality_vs_time.png", "perplexity_vs_entropy.png"):
        assert (out / name).read_bytes()[:8] == PNG
    md = (out / "report.md").read_text()
    results = json.loads((out / "report.json").read_text())
    assert results["n"] == 4 and results["seed"] == 5 and "4 samples" in results["caption"]
    assert "seed 5" in results["caption"]
    settings = [(r["model"], r["setting"]) for r in results["rows"]]
    assert len(settings) == 1 + 3 + 1 + 2  # flow; onestep T=0, T=1, flow-inverse; ar; mdlm 1 and 4 steps
    for model, setting in settings:
        assert f"| {model} | {setting} |" in md
    assert "| data | validation windows |" in md and "<= " in md
    flow_row = next(r for r in results["rows"] if r["kind"] == "flow")
    assert flow_row["likelihood"]["bound"] and flow_row["latency_s"] > 0 and flow_row["throughput_seq_per_s"] > 0
    ar_row = next(r for r in results["rows"] if r["kind"] == "ar")
    assert not ar_row["likelihood"]["bound"]
    assert results["data"]["unigram_entropy_nats"] > 0
    # the frontier: each swept sampler at T = 0.5 and 1 (one-step also at its main T = 0)
    onestep = sorted(s["temperature_or_tau"] for s in results["sweep"] if s["sampler"] == "onestep")
    assert onestep == [0.0, 0.5, 1.0]
    assert {s["sampler"] for s in results["sweep"]} == {"onestep", "flow-inverse", "ar", "mdlm"}
    # sample figures also land in each run's eval.json
    assert "mdlm steps=4 T=1" in json.loads((tiny_runs["mdlm"] / "eval.json").read_text())["samples"]
