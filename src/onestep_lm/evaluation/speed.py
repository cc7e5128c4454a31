"""Speed of whole-sequence generation (METHOD.md, "Metrics"): every sampler setting of the given runs, timed in
one process.

- Timing: after `warmup` untimed calls of every setting, `rounds` rounds each time one call of every setting,
  the order rotated from round to round (so no setting always follows the same one); the median per setting is
  reported. perf_counter around each call, with a device synchronisation on GPU.
- latency: seconds for one sequence at the smallest batch (default 1); throughput: sequences/s and tokens/s at
  the largest batch (default 64).
- FLOPs per sample (analytic): the matmul FLOPs (2 per multiply-add) of the network passes a sampler makes for
  one sequence: linear layers, and the attention products QK^T and AV (4 * width per query per attended
  position per layer). Layer norms, softmaxes, element-wise work and the draws are left out. MDLM's count uses
  the network calls it actually made (a step in which nothing was revealed reuses the logits).
- achieved FLOP/s = FLOPs per sample * sequences/s, and its fraction of the matmul peak: the best of several
  float32 torch.matmul calls of size x size, timed on the same device in the same run.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch
from torch import nn

from ..errors import ConfigError
from ..runs import Run
from ..sampling import sample_tokens
from .sample_eval import Setting, sampler_settings


# ---- analytic FLOPs -------------------------------------------------------------------------------------
def linear_flops(*modules: nn.Module) -> int:
    """Matmul FLOPs of one token through every nn.Linear of the modules (2 per weight)."""
    return sum(2 * m.in_features * m.out_features for mod in modules for m in mod.modules()
               if isinstance(m, nn.Linear))


def attention_flops(net, attended: int) -> int:
    """QK^T and AV FLOPs of a transformer for queries attending to `attended` positions in total (summed over the
    queries): 4 * width per query-position pair per layer."""
    width = net.layers[0].attn.qkv.in_features
    return 4 * width * attended * len(net.layers)


def flow_inverse_flops(flow, L: int) -> int:
    """The exact inverse: each block runs L single-position steps against a KV cache (step t attends to t + 1
    positions), then the tied decoder compares each u_t with every codebook mean."""
    total = 0
    for block in flow.blocks:
        total += L * linear_flops(block.inp, block.net, block.head) + attention_flops(block.net, L * (L + 1) // 2)
    return total + L * 2 * flow.d * flow.vocab_size


def flops_per_sample(run: Run, setting: Setting, L: int, nfe: float | None = None) -> float:
    """Analytic matmul FLOPs to generate one sequence of L tokens with a setting (MDLM: `nfe` network calls)."""
    m = run.model
    if setting.sampler == "flow-inverse":
        return flow_inverse_flops(run.flow, L)
    if setting.sampler == "onestep":  # one bidirectional pass of G over L positions (the alignment heads unused)
        return L * linear_flops(m.inp, m.net, m.head) + attention_flops(m.net, L * L)
    if setting.sampler == "ar":  # L single-position passes with a KV cache (BOS, then x_0 .. x_{L-2})
        return L * linear_flops(m.transformer, m.head) + attention_flops(m.transformer, L * (L + 1) // 2)
    if setting.sampler == "mdlm":
        per_call = L * linear_flops(m.transformer, m.head) + attention_flops(m.transformer, L * L)
        return per_call * (nfe if nfe is not None else (setting.steps or L))
    raise ValueError(f"unknown sampler {setting.sampler!r}")


# ---- timing ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: str | torch.device = "cpu", size: int = 1024, repeats: int = 8) -> dict:
    """The machine's float32 matmul rate: best and median of `repeats` timed (size x size) @ (size x size)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(2):
        torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        times.append(time.perf_counter() - t)
    flops = 2 * size ** 3
    return {"dtype": "float32", "size": size, "repeats": repeats, "flops_per_s": flops / min(times),
            "median_flops_per_s": flops / statistics.median(times)}


def _machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["loadavg_1m_start"] = os.getloadavg()[0]
    return info


def run_label(run: Run, names: dict) -> str:
    return names.get(str(run.dir), run.dir.name)


def bench_speed(runs: list[Run], batches: list[int] = (1, 64), length: int | None = None, rounds: int = 5,
                warmup: int = 1, mdlm_steps: list[int] | None = None, names: dict | None = None,
                peak_size: int = 1024, progress: bool = False) -> dict:
    """Time every sampler setting of `runs` (see the module docstring); a JSON-ready dict."""
    if not runs:
        raise ConfigError("no runs to time")
    names = names or {}
    device = runs[0].device
    L = length or min(r.config.data.seq_len for r in runs)
    if not 1 <= L <= min(r.config.data.seq_len for r in runs):
        raise ConfigError(f"--length {L} must be between 1 and the shortest seq_len of the runs")
    if rounds < 1 or warmup < 0 or not batches or min(batches) < 1:
        raise ConfigError("bench speed needs rounds >= 1, warmup >= 0 and batch sizes >= 1")
    items = [(run, s, f"{run_label(run, names)}: {s.label}") for run in runs
             for s in sampler_settings(run.kind, L, mdlm_steps)]
    machine = _machine(device)
    peak = matmul_peak(device, peak_size)
    times = {label: {b: [] for b in batches} for _, _, label in items}
    nfe = {label: {b: [] for b in batches} for _, _, label in items}

    def call(run, setting, b, seed):
        sample_tokens(run, b, seed=seed, seq_len=L, **setting.options())

    for b in batches:
        for _ in range(warmup):
            for run, s, _label in items:
                call(run, s, b, 0)
        for r in range(rounds):
            shift = r % len(items)
            for run, s, label in items[shift:] + items[:shift]:
                _sync(device)
                t = time.perf_counter()
                call(run, s, b, r + 1)
                _sync(device)
                times[label][b].append(time.perf_counter() - t)
                if s.sampler == "mdlm":
                    nfe[label][b].append(run.model.last_sample_nfe)
            if progress:
                print(f"batch {b}: round {r + 1}/{rounds} done", flush=True)

    settings = []
    for run, s, label in items:
        entry = {"label": label, "setting": s.label, "run": str(run.dir.resolve()), "kind": run.kind, **s.options(),
                 "by_batch": {}}
        for b in batches:
            med = statistics.median(times[label][b])
            calls = statistics.mean(nfe[label][b]) if nfe[label][b] else None
            flops = flops_per_sample(run, s, L, calls)
            achieved = flops * b / med
            entry["by_batch"][str(b)] = {
                "median_s": med, "times_s": times[label][b], "seq_per_s": b / med, "tokens_per_s": b * L / med,
                "flops_per_sample": flops, "nfe": calls, "achieved_flops_per_s": achieved,
                "fraction_of_peak": achieved / peak["flops_per_s"]}
        lo, hi = entry["by_batch"][str(min(batches))], entry["by_batch"][str(max(batches))]
        entry.update({"latency_s": lo["median_s"], "latency_batch": min(batches),
                      "throughput_seq_per_s": hi["seq_per_s"], "throughput_tokens_per_s": hi["tokens_per_s"],
                      "throughput_batch": max(batches), "flops_per_sample": hi["flops_per_sample"],
                      "achieved_flops_per_s": hi["achieved_flops_per_s"],
                      "fraction_of_peak": hi["fraction_of_peak"]})
        settings.append(entry)
    if hasattr(os, "getloadavg"):
        machine["loadavg_1m_end"] = os.getloadavg()[0]
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine, "length": L, "batches": list(batches),
              "rounds": rounds, "warmup": warmup, "matmul_peak": peak, "settings": settings}
    result["ratios_vs_ar"] = ratios_vs_ar(settings)
    return result


def ratios_vs_ar(settings: list[dict]) -> dict:
    """For each setting: AR's latency / its latency (speed-up) and its throughput / AR's (first AR setting)."""
    ar = next((s for s in settings if s["sampler"] == "ar"), None)
    if ar is None:
        return {}
    return {s["label"]: {"latency_speedup": ar["latency_s"] / s["latency_s"],
                         "throughput_ratio": s["throughput_seq_per_s"] / ar["throughput_seq_per_s"]}
            for s in settings}


def format_speed(result: dict) -> str:
    peak = result["matmul_peak"]["flops_per_s"]
    lb, tb = min(result["batches"]), max(result["batches"])
    lines = [f"L={result['length']}, {result['rounds']} rounds after {result['warmup']} warm-up, medians; "
             f"{result['machine']['device']}, {result['machine']['torch_threads']} threads; "
             f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s",
             f"{'setting':44s} {'latency@' + str(lb):>12s} {'seq/s@' + str(tb):>10s} {'tok/s':>10s} "
             f"{'GFLOP/seq':>10s} {'%peak':>6s} {'vs AR lat':>9s} {'vs AR thr':>9s}"]
    ratios = result.get("ratios_vs_ar", {})
    for s in result["settings"]:
        r = ratios.get(s["label"])
        rl = f"{r['latency_speedup']:.2f}x" if r else "-"
        rt = f"{r['throughput_ratio']:.2f}x" if r else "-"
        lines.append(f"{s['label'][:44]:44s} {s['latency_s'] * 1e3:10.2f}ms {s['throughput_seq_per_s']:10.1f} "
                     f"{s['throughput_tokens_per_s']:10.0f} {s['flops_per_sample'] / 1e9:10.4f} "
                     f"{100 * s['fraction_of_peak']:6.2f} {rl:>9s} {rt:>9s}")
    return "\n".join(lines)
