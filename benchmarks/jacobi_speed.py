"""Time the flow's sequential (KV-cached) inverse against its Jacobi inverse on the same z; print JSON.

    python benchmarks/jacobi_speed.py RUN [--n 64] [--tol 1e-3,1e-4] [--threads 1]

RUN is a flow or generator run folder (a generator's own flow is used). Reported: the sequential inverse's
seconds; one Jacobi sweep of each block alone (from z, in the order the inverse runs them: block K first); and
for each tolerance the whole Jacobi inverse's seconds, its sweeps per block, the largest |u_jacobi - u_sequential|
and the agreement of the decoded tokens. A Mix-d block's sweep is a mixture root-find over all B x T x V entries
and it needs about T sweeps, so the whole Jacobi inverse is skipped for a Mix-d flow unless --mixd is given.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from onestep_lm.models.mixture_blocks import MixdBlock
from onestep_lm.runs import open_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=64, help="sequences (one batch)")
    parser.add_argument("--tol", default="1e-3,1e-4", help="comma-separated Jacobi tolerances")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixd", action="store_true", help="time the whole Jacobi inverse of a Mix-d flow too")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    run = open_run(args.run)
    flow = (run.model.flow if run.kind == "generator" else run.model).eval()
    z = torch.randn(args.n, flow.seq_len, flow.d, generator=torch.Generator().manual_seed(args.seed))
    out = {"run": args.run, "n": args.n, "seq_len": flow.seq_len, "threads": args.threads, "seed": args.seed,
           "blocks": [type(b).__name__ for b in flow.blocks]}

    started = time.perf_counter()
    u_seq = flow.inverse(z)
    out["sequential_s"] = time.perf_counter() - started
    x_seq = flow.codebook.decode(u_seq)
    out["one_sweep_s"] = []
    for block in reversed(flow.blocks):
        started = time.perf_counter()
        block.inverse_jacobi(z, tol=0.0, max_sweeps=1)
        out["one_sweep_s"].append(time.perf_counter() - started)

    if args.mixd or not any(isinstance(b, MixdBlock) for b in flow.blocks):
        for tol in (float(t) for t in args.tol.split(",")):
            started = time.perf_counter()
            u, sweeps = flow.inverse_jacobi(z, tol=tol)
            out[f"jacobi_tol_{tol:g}"] = {
                "seconds": time.perf_counter() - started, "sweeps": sweeps,
                "max_abs_du": (u - u_seq).abs().max().item(),
                "token_agreement": (flow.codebook.decode(u) == x_seq).float().mean().item()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
