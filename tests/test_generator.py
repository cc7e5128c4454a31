"""Stage B: the one-step generator learns the flow's inverse; alignment; sampling; pairing with its flow."""

import shutil

import pytest
import torch

from onestep_lm.config import FlowConfig, GeneratorConfig
from onestep_lm.errors import RunError
from onestep_lm.models.flow_lm import FlowLM
from onestep_lm.models.generator import OneStepGenerator

from synthetic import MarkovSource


def random_flow(V=6, T=8, seed=0):
    torch.manual_seed(seed)
    flow = FlowLM(V, T, FlowConfig(d=4, blocks=2, layers_per_block=1, width=16, heads=2, sigma_init=0.15))
    for block in flow.blocks:  # a real (non-identity) transform
        torch.nn.init.normal_(block.head.weight, std=0.1)
    return flow


def fit(gen, src, steps, T=8, lr=3e-3):
    opt = torch.optim.Adam([p for p in gen.parameters() if p.requires_grad], lr=lr)
    history = []
    gen.train()
    for step in range(steps):
        loss, metrics = gen(src.sample(64, T, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v) for k, v in metrics.items()})
    return history


def test_reconstruction_accuracy_rises_above_0_9():
    src = MarkovSource(vocab_size=6, seed=1)
    gen = OneStepGenerator(random_flow(), GeneratorConfig(width=32, depth=2, heads=2))
    fit(gen, src, 300)
    gen.eval()
    x = src.sample(512, 8, seed=999)  # held out
    with torch.no_grad():
        z, _, _ = gen.encode(x, generator=torch.Generator().manual_seed(0))
        accuracy = (gen.logits(z).argmax(-1) == x).float().mean().item()
    assert accuracy > 0.9, accuracy


@pytest.mark.parametrize("target", ["latents", "hidden"])
def test_alignment_loss_falls_when_on_and_is_absent_when_off(target):
    src = MarkovSource(vocab_size=6, seed=2)
    gen = OneStepGenerator(random_flow(seed=1), GeneratorConfig(width=32, depth=2, heads=2, align_lambda=1.0,
                                                                align_target=target))
    history = fit(gen, src, 150)
    first = sum(h["align"] for h in history[:10]) / 10
    last = sum(h["align"] for h in history[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    off = OneStepGenerator(random_flow(seed=1), GeneratorConfig(width=32, depth=2, heads=2, align_lambda=0.0))
    _, metrics = off(src.sample(4, 8, seed=0))
    assert "align" not in metrics and len(off.align) == 0


def test_frozen_flow_is_not_trained_nor_saved():
    flow = random_flow()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    gen = OneStepGenerator(flow, GeneratorConfig(width=16, depth=1, heads=2))
    fit(gen, MarkovSource(vocab_size=6), 5)
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())
    assert not any(k.startswith("flow.") for k in gen.state_dict())


def test_sampling_is_deterministic_for_a_seed(tiny_pipeline):
    import onestep_lm

    m = onestep_lm.load(tiny_pipeline / "generator")
    assert m.generate(4, seed=7) == m.generate(4, seed=7)
    assert m.generate(4, seed=7) != m.generate(4, seed=8)
    hot = m.generate(4, seed=7, temperature=1.0)
    assert hot == m.generate(4, seed=7, temperature=1.0) and all(len(t) == 32 for t in hot)
    assert len(m.generate(2, sampler="flow-inverse", seed=1)) == 2
    texts = ["First Citizen:", "Before we proceed"]
    assert m.decode(m.encode(texts)) == texts  # a generator run encodes and decodes with its flow


def test_generator_refuses_a_flow_with_other_weights(tiny_pipeline, tmp_path):
    import onestep_lm
    from onestep_lm.train.checkpoint import latest_checkpoint, load_state, load_weights, save_checkpoint

    flow_dir, gen_dir = tmp_path / "flow", tmp_path / "generator"
    shutil.copytree(tiny_pipeline / "flow", flow_dir)
    shutil.copytree(tiny_pipeline / "generator", gen_dir)
    import json
    meta = json.loads((gen_dir / "run.json").read_text())
    meta["flow"]["path"] = str(flow_dir)
    (gen_dir / "run.json").write_text(json.dumps(meta))
    onestep_lm.load(gen_dir)  # the flow it was trained on: fine
    ckpt = latest_checkpoint(flow_dir)
    weights = load_weights(ckpt)
    weights["codebook.mu"] = weights["codebook.mu"] + 0.01
    save_checkpoint(flow_dir, 10**6, weights, load_state(ckpt))  # the flow folder now holds other weights
    with pytest.raises(RunError, match="refusing to pair"):
        onestep_lm.load(gen_dir)
