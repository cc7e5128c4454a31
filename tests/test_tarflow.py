"""TarFlow blocks and the flow stack: exact inverse, log-det against autograd, causality, KV cache."""

import pytest
import torch

from onestep_lm.config import FlowConfig
from onestep_lm.models.flow_lm import FlowLM
from onestep_lm.models.tarflow import AffineBlock


def random_flow(seed=0, d=3, T=6, blocks=3, scale=0.05):
    """A small flow whose output heads are random (not the zero init), so every block really transforms."""
    torch.manual_seed(seed)
    flow = FlowLM(vocab_size=7, seq_len=T, cfg=FlowConfig(d=d, blocks=blocks, layers_per_block=1, width=16, heads=2))
    for block in flow.blocks:
        torch.nn.init.normal_(block.head.weight, std=scale)
        torch.nn.init.normal_(block.head.bias, std=scale)
    return flow.eval()


def test_zero_initialised_blocks_are_the_identity():
    torch.manual_seed(0)
    flow = FlowLM(7, 5, FlowConfig(d=2, blocks=2, layers_per_block=1, width=8, heads=2))
    u = torch.randn(3, 5, 2)
    z, logdet, _, _ = flow.flow(u)
    assert torch.equal(z, u) and torch.equal(logdet, torch.zeros(3))


def test_inverse_of_forward_is_identity():
    flow = random_flow()
    u = torch.randn(4, 6, 3)
    z, _, _, _ = flow.flow(u)
    assert (z - u).abs().max() > 1e-2, "the random heads should move the points"
    assert torch.allclose(flow.inverse(z), u, atol=1e-4)


def test_kv_cache_inverse_equals_uncached_inverse():
    flow = random_flow(seed=1)
    z = torch.randn(3, 6, 3)
    assert torch.allclose(flow.inverse(z, use_cache=True), flow.inverse(z, use_cache=False), atol=1e-5)


def test_logdet_equals_autograd_jacobian():
    flow = random_flow(seed=2, d=2, T=4, scale=0.2)
    u = torch.randn(1, 4, 2)
    _, logdet, _, _ = flow.flow(u)
    jac = torch.autograd.functional.jacobian(lambda a: flow.flow(a.view(1, 4, 2))[0].reshape(-1), u.reshape(-1))
    assert torch.allclose(logdet[0], torch.linalg.slogdet(jac)[1], atol=1e-4)
    assert logdet.abs().item() > 1e-2


@pytest.mark.parametrize("reverse", [False, True])
def test_block_parameters_depend_only_on_earlier_positions(reverse):
    """In the block's own order, the scale and shift at position t ignore positions t, t+1, ...: changing
    position s alters y only at positions >= s (y_s through v_s itself, later ones through a, b)."""
    torch.manual_seed(3)
    block = AffineBlock(d=2, seq_len=6, width=16, depth=1, heads=2, reverse=reverse).eval()
    torch.nn.init.normal_(block.head.weight, std=0.3)
    v = torch.randn(1, 6, 2)
    y, _, _ = block(v)
    for s in range(6):
        w = v.clone()
        w[0, s] += 1.0
        y2, _, _ = block(w)
        changed = (y2 - y).abs().amax(-1)[0] > 1e-6
        order = list(range(6))[::-1] if reverse else list(range(6))
        before = order[:order.index(s)]  # positions that come before s in this block's order
        assert not changed[before].any(), f"position {s} leaked into earlier positions"
        assert changed[s]
        later = order[order.index(s) + 1:]
        assert changed[later].all(), "later positions should see position s"


def test_affine_step_logdet_and_decoder_stay_float32_under_bf16_autocast():
    flow = random_flow(seed=4)
    x = torch.randint(0, 7, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = flow.elbo_terms(x)
        z, logdet, latents, _ = flow.flow(torch.randn(2, 6, 3))
        log_post = flow.codebook.log_posterior(torch.randn(2, 6, 3))
    assert z.dtype == logdet.dtype == log_post.dtype == torch.float32
    assert all(torch.isfinite(terms[k]).all() for k in ("decoder", "prior", "logdet", "entropy"))
