"""Issue #8: the transport penalty (kept out of the bound), the Jacobi inverse, prior pairs in Stage B."""

import json

import pytest
import torch

from onestep_lm.config import FlowConfig, GeneratorConfig, PriorPairsConfig, TransportConfig, load_config
from onestep_lm.errors import ConfigError
from onestep_lm.models.flow_lm import FlowLM
from onestep_lm.models.generator import OneStepGenerator
from onestep_lm.nn.noise import BatchNoise

from synthetic import MarkovSource
from test_mixture import KINDS, make_block

MIXED = [{"type": "mixd", "layers": 1}, {"type": "mix1", "layers": 1, "components": 3},
         {"type": "affine", "layers": 1}]


def random_flow(blocks=MIXED, V=5, T=6, d=3, seed=0, transport=None, sigma=0.5):
    """A flow of every block type with random (not zero-initialised) heads."""
    torch.manual_seed(seed)
    cfg = FlowConfig(d=d, blocks=blocks, width=16, heads=2, sigma_init=sigma,
                     transport=transport or TransportConfig())
    flow = FlowLM(V, T, cfg)
    for block in flow.blocks:
        for module in block.head.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.1)
    return flow.eval()


# ---- the penalty -----------------------------------------------------------------------------------------
def test_transport_config_is_validated():
    with pytest.raises(ConfigError, match="model.flow.transport.weight"):
        load_config(None, ["model.flow.transport.weight=-1"])
    with pytest.raises(ConfigError, match="model.flow.transport.kind"):
        load_config(None, ["model.flow.transport.kind=sideways"])
    with pytest.raises(ConfigError, match="model.generator.prior.fraction"):
        load_config(None, ["model.generator.prior.fraction=1.5"])
    with pytest.raises(ConfigError, match="model.generator.prior.inverse"):
        load_config(None, ["model.generator.prior.inverse=newton"])


@pytest.mark.parametrize("kind", ["end", "blocks"])
def test_penalty_is_added_to_the_loss_and_left_out_of_the_bound(kind):
    beta = 0.7
    flow = random_flow(transport=TransportConfig(weight=beta, kind=kind))
    x = torch.randint(0, 5, (4, 6))
    loss, metrics = flow.loss(x, noise=BatchNoise(3))
    terms = flow.elbo_terms(x, noise=BatchNoise(3))
    latents = terms["latents"]
    bound = terms["neg_elbo"].sum() / (x.numel() * torch.log(torch.tensor(2.0)))
    if kind == "end":
        displacement = ((latents[-1] - latents[0]) ** 2).sum(-1).mean()
    else:
        displacement = sum(((b - a) ** 2).sum(-1).mean() for a, b in zip(latents, latents[1:]))
    assert displacement > 0.01
    assert torch.allclose(metrics["bound"], bound, atol=1e-5)
    assert torch.allclose(metrics["transport"], displacement, atol=1e-5)
    assert torch.allclose(loss, bound + beta * displacement, atol=1e-5)
    # the reported bound is the same with or without the penalty
    plain = random_flow(transport=TransportConfig(weight=0.0, kind=kind))
    plain_loss, plain_metrics = plain.loss(x, noise=BatchNoise(3))
    assert torch.allclose(plain_loss, metrics["bound"], atol=1e-5)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(flow.nll(x, generator=g), plain.nll(x, generator=torch.Generator().manual_seed(0)))


def _train_displacement(weight, steps=120):
    src = MarkovSource(vocab_size=5, seed=4)
    torch.manual_seed(0)
    flow = FlowLM(5, 6, FlowConfig(d=3, blocks=2, layers_per_block=1, width=16, heads=2,
                                   transport=TransportConfig(weight=weight)))
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for step in range(steps):
        loss, _ = flow.loss(src.sample(32, 6, seed=step), noise=BatchNoise(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, metrics = flow.loss(src.sample(256, 6, seed=10_000), noise=BatchNoise(0))
    return float(metrics["displacement"]), float(metrics["bound"])


def test_penalty_shrinks_the_displacement():
    free, _ = _train_displacement(0.0)
    penalised, _ = _train_displacement(1.0)
    assert penalised < 0.5 * free, (free, penalised)


# ---- the Jacobi inverse ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_jacobi_block_inverse_is_exact_after_T_sweeps(kind):
    block, inputs = make_block(kind, reverse=True)
    v = inputs(4)
    y, _, _ = block(v)
    T = v.shape[1]
    w, sweeps = block.inverse_jacobi(y, tol=0.0)
    assert sweeps <= T
    assert torch.allclose(w, block.inverse(y), atol=1e-4)
    assert torch.allclose(w, v, atol=1e-4)
    # after s sweeps the first s positions in the block's order (the last s, as it runs right to left) are exact
    for s in range(1, T):
        w, made = block.inverse_jacobi(y, tol=0.0, max_sweeps=s)
        assert made == s
        assert torch.allclose(w[:, T - s:], v[:, T - s:], atol=1e-4)


def test_jacobi_flow_inverse_equals_the_sequential_one():
    flow = random_flow()
    x = torch.randint(0, 5, (8, 6))
    u = flow.codebook.sample(x)[0].detach()
    z, _, _, _ = flow.flow(u)
    exact, sweeps = flow.inverse_jacobi(z, tol=1e-6)
    assert len(sweeps) == len(flow.blocks) and all(1 <= s <= 6 for s in sweeps)
    assert torch.allclose(exact, flow.inverse(z), atol=1e-4)
    assert torch.allclose(exact, u, atol=1e-4)


def test_jacobi_stops_early_near_the_identity():
    flow = random_flow(blocks=3, seed=1)  # affine blocks with small random heads: close to the identity
    for block in flow.blocks:
        torch.nn.init.normal_(block.head.weight, std=0.01)
    z = torch.randn(4, 6, 3)
    u, sweeps = flow.inverse_jacobi(z, tol=1e-5)
    assert max(sweeps) < 6, sweeps
    assert torch.allclose(u, flow.inverse(z), atol=1e-4)


# ---- prior pairs -----------------------------------------------------------------------------------------
def prior_generator(fraction=0.5, inverse="sequential", seed=0, sigma=0.5):
    prior = PriorPairsConfig(fraction=fraction, pool=32, refresh_every=5, inverse=inverse, tol=1e-6)
    flow = random_flow(sigma=sigma)
    torch.manual_seed(seed)
    return OneStepGenerator(flow, GeneratorConfig(width=16, depth=2, heads=2, prior=prior))


@pytest.mark.parametrize("inverse", ["sequential", "jacobi"])
def test_pool_holds_the_teachers_own_samples_and_is_rebuilt_from_the_seed(inverse):
    gen = prior_generator(inverse=inverse)
    gen.before_step(0, seed=7)
    u, x = gen._pool
    assert u.shape == (32, 6, 3) and x.shape == (32, 6)
    z, _, _, _ = gen.flow.flow(u)
    assert torch.equal(gen.flow.codebook.decode(gen.flow.inverse(z)), x)  # x* = decode(f^{-1}(z))
    assert abs(z.mean()) < 0.2 and 0.8 < z.std() < 1.2  # z ~ N(0, I)
    again = prior_generator(inverse=inverse, seed=1)  # another process / a resumed run: the same pool
    again.before_step(3, seed=7)  # step 3 is in the same refill (refresh_every 5)
    assert torch.allclose(again._pool[0], u, atol=1e-5) and torch.equal(again._pool[1], x)
    gen.before_step(5, seed=7)  # the next refill draws a new pool
    assert not torch.allclose(gen._pool[0], u)


def test_prior_rows_train_on_pool_pairs_and_evaluation_uses_data_only():
    gen = prior_generator(fraction=0.5)
    gen.train()
    with pytest.raises(RuntimeError, match="pool is empty"):
        gen(torch.randint(0, 5, (8, 6)))
    gen.before_step(0, seed=0)
    x = torch.randint(0, 5, (8, 6))
    loss, metrics = gen(x, noise=BatchNoise(1))
    assert "prior_accuracy" in metrics and torch.isfinite(loss)
    u = gen.flow.draw_u(x, noise=BatchNoise(1))[0]
    mixed_u, target, prior = gen._mix_prior(x, u, BatchNoise(1))
    assert prior.tolist() == [True] * 4 + [False] * 4
    pool_u, pool_x = gen._pool
    for row in range(4):  # each prior row is one pool pair, u and target together
        match = (pool_u - mixed_u[row]).abs().amax(dim=(1, 2)) == 0
        assert match.any() and torch.equal(pool_x[match][0], target[row])
    assert torch.equal(target[4:], x[4:]) and torch.equal(mixed_u[4:], u[4:])
    # a process holding rows 4..7 of the same global batch of 8 gets the data rows, the same as above
    _, part_target, part_prior = gen._mix_prior(x[4:], u[4:], BatchNoise(1, start=4, total=8))
    assert not part_prior.any() and torch.equal(part_target, x[4:])
    gen.eval()
    _, eval_metrics = gen(x)
    assert "prior_accuracy" not in eval_metrics


def test_prior_pairs_raise_teacher_agreement():
    """Training on the teacher's own pairs must help where G is sampled, z ~ N(0, I) (observed: 0.64 -> 0.71)."""
    src = MarkovSource(vocab_size=5, seed=3)

    def agreement(fraction):
        gen = prior_generator(fraction=fraction, seed=2)
        opt = torch.optim.Adam([p for p in gen.parameters() if p.requires_grad], lr=3e-3)
        gen.train()
        for step in range(150):
            gen.before_step(step, seed=0)
            loss, _ = gen(src.sample(32, 6, seed=step), noise=BatchNoise(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
        gen.eval()
        return gen.teacher_agreement(512, generator=torch.Generator().manual_seed(5))[0]

    without, with_prior = agreement(0.0), agreement(1.0)
    assert with_prior > without + 0.04, (without, with_prior)


# ---- the command line ------------------------------------------------------------------------------------
def test_cli_sweep_trains_each_weight_once_and_plots_the_tradeoff(tmp_path, tiny_pipeline):
    from test_cli import TINY, cli

    out = tmp_path / "sweep"
    common = ["--config", TINY, "--out", out, "--prior-fractions", "0,1", "--set", "train.max_steps=20",
              "--set", "model.generator.prior.pool=16", "--set", "model.generator.prior.refresh_every=10",
              "--no-progress"]
    cli("sweep", "--weights", "0", *common)
    flow_summary = (out / "beta0" / "flow" / "train_summary.json").read_bytes()
    done = cli("sweep", "--weights", "0,1", "--judge", tiny_pipeline / "judge", "--samples", 4, *common)
    assert "already trained" in done.stderr  # beta 0's stages are kept, not trained again
    assert (out / "beta0" / "flow" / "train_summary.json").read_bytes() == flow_summary
    result = json.loads((out / "sweep.json").read_text())
    assert [(r["weight"], r["prior_fraction"]) for r in result["rows"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for row in result["rows"]:
        assert 0 <= row["generator"]["teacher_agreement"] <= 1
        assert row["flow"]["displacement_per_dim"] > 0 and row["generator"]["samples"]["n"] == 4
    assert (out / "sweep.png").stat().st_size > 0
    assert "<=" in (out / "sweep.md").read_text()
    gen_cfg = (out / "beta1" / "gen_prior1" / "config.yaml").read_text()
    assert "fraction: 1.0" in gen_cfg and "weight: 1.0" in gen_cfg


def test_cli_samples_with_the_jacobi_inverse(tiny_pipeline):
    from test_cli import cli

    exact = cli("sample", "--run", tiny_pipeline / "flow", "-n", 3, "--sampler", "flow-inverse")
    jacobi = cli("sample", "--run", tiny_pipeline / "flow", "-n", 3, "--sampler", "flow-jacobi", "--tol", 0)
    assert jacobi.stdout == exact.stdout
    assert "sweeps per block" in jacobi.stderr
    bad = cli("sample", "--run", tiny_pipeline / "flow", "--sampler", "flow-jacobi", "--max-sweeps", 0, check=False)
    assert bad.returncode == 2 and "max_sweeps" in bad.stderr
