"""Typed configuration: dataclasses loaded from YAML, `--set key=value` overrides, validation with clear errors.

Every key is checked: an unknown key names the allowed ones, a wrong type names the expected one, and a
value outside its choices names the allowed values. A config is saved with each run (config.yaml) so that a
run folder is self-describing. The machinery that builds and checks dataclasses from mappings is in schema.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .schema import build, divides, positive, to_plain

MODEL_KINDS = ("flow", "generator", "ar", "mdlm")
OVERRIDE_SECTIONS = (*MODEL_KINDS, "judge")  # train.<section>: per-model overrides of the train keys


@dataclass
class DataConfig:
    source: str = "shakespeare"  # the embedded Tiny Shakespeare; or text, ptb, ptb-char, wikitext2, text8
    path: str | None = None  # a text file (source=text) or a folder (ptb, ptb-char, wikitext2, text8)
    tokenizer: str = "char"  # char | bpe (trained on the training split) | gpt2 (encoder.json + vocab.bpe)
    vocab_size: int = 512  # for tokenizer=bpe
    tokenizer_path: str | None = None  # folder with encoder.json and vocab.bpe, for tokenizer=gpt2
    unk: bool = False  # char tokenizer: map characters unseen in training to <unk> instead of failing
    seq_len: int = 64  # T, the window length in tokens
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])  # train/val/test of a plain text file
    cache_dir: str | None = None  # tokenized-split cache; default $ONESTEP_LM_CACHE or ~/.cache/onestep-lm

    CHOICES = {
        "source": ("shakespeare", "text", "ptb", "ptb-char", "wikitext2", "text8"),
        "tokenizer": ("char", "bpe", "gpt2"),
    }

    def validate(self) -> None:
        if self.source in ("text", "ptb", "ptb-char", "wikitext2", "text8") and not self.path:
            raise ConfigError(f"config key data.path is required when data.source is {self.source!r}")
        if self.tokenizer == "gpt2" and not self.tokenizer_path:
            raise ConfigError("config key data.tokenizer_path (a folder with encoder.json and vocab.bpe) is "
                              "required when data.tokenizer is 'gpt2'")
        positive("data.seq_len", self.seq_len, minimum=2)
        positive("data.vocab_size", self.vocab_size, minimum=2)
        if len(self.split) not in (2, 3) or any(s < 0 for s in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(f"config key data.split: {self.split} must be 2 or 3 non-negative fractions "
                              "summing to 1 (train, val[, test])")


@dataclass
class TransportConfig:
    """A transport penalty on the flow (issue #8): weight * displacement per token is added to the training loss,
    and left out of the bound. kind `end`: ||z - u||^2, the end-to-end displacement; kind `blocks`: the sum of each
    block's own displacement, sum_k ||v_k - v_{k-1}||^2 (the length of the path, squared step by step)."""

    weight: float = 0.0  # beta; 0 turns the penalty off (the displacement is logged either way)
    kind: str = "end"

    CHOICES = {"kind": ("end", "blocks")}

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"config key model.flow.transport.weight: {self.weight} must be >= 0")


FLOW_BLOCK_TYPES = ("affine", "mix1", "mixd")
FLOW_BLOCK_KEYS = ("type", "layers", "count", "components")


@dataclass
class FlowConfig:
    d: int = 8  # latent size per token
    # K flow blocks, directions alternating. An integer: that many affine blocks of layers_per_block layers.
    # Or a list, one entry per block (or per `count` equal blocks), e.g.
    #   [{type: mixd, layers: 2}, {type: mix1, layers: 4}, {type: affine, layers: 1, count: 4}]
    # with type affine | mix1 (1-D mixture CDF per scalar) | mixd (codebook mixture, first block only), and
    # optional layers (default layers_per_block), count (default 1), components (mix1; default mixture_components)
    blocks: int | list[dict[str, Any]] = 4
    layers_per_block: int = 2  # transformer layers inside each block
    width: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    clip: float = 3.0  # log-scale soft clip: a = clip * tanh(a_raw / clip)
    mu_init: float = 1.0  # std of the codebook means at initialisation
    sigma_init: float = 0.3  # codebook scale at initialisation
    mixture_components: int = 8  # M, the components of each mix1 block's 1-D mixtures
    # progressive freezing: entry k is the training step from which block k (0-based) stops training (the
    # codebook freezes with block 0); non-decreasing, at most one entry per block; empty: nothing freezes
    freeze_schedule: list[int] = field(default_factory=list)
    transport: TransportConfig = field(default_factory=TransportConfig)  # the transport penalty (issue #8)

    def validate(self) -> None:
        self.transport.validate()
        for key in ("d", "layers_per_block", "width", "heads", "mlp_ratio", "mixture_components"):
            positive(f"model.flow.{key}", getattr(self, key))
        divides("model.flow", self.width, self.heads)
        positive("model.flow.clip", self.clip)
        positive("model.flow.sigma_init", self.sigma_init)
        K = self.num_blocks()
        s = self.freeze_schedule
        if len(s) > K or any(v < 0 for v in s) or any(a > b for a, b in zip(s, s[1:])):
            raise ConfigError(f"config key model.flow.freeze_schedule: {s} must be at most {K} (the number of "
                              "blocks) non-negative, non-decreasing training steps")

    def num_blocks(self) -> int:
        return len(self.block_specs())

    def block_specs(self) -> list[dict[str, Any]]:
        """One {type, layers, components} per flow block, in order (validated)."""
        if isinstance(self.blocks, int):
            positive("model.flow.blocks", self.blocks)
            return [{"type": "affine", "layers": self.layers_per_block, "components": self.mixture_components}
                    for _ in range(self.blocks)]
        specs = []
        for i, item in enumerate(self.blocks):
            where = f"model.flow.blocks[{i}]"
            unknown = [k for k in item if k not in FLOW_BLOCK_KEYS]
            if unknown:
                raise ConfigError(f"unknown config key '{where}.{unknown[0]}'; allowed keys: "
                                  f"{', '.join(FLOW_BLOCK_KEYS)}")
            if item.get("type") not in FLOW_BLOCK_TYPES:
                raise ConfigError(f"config key {where}.type: {item.get('type')!r} is not one of "
                                  f"{', '.join(FLOW_BLOCK_TYPES)}")
            values = {"layers": self.layers_per_block, "count": 1, "components": self.mixture_components}
            for key in values:
                if key in item:
                    if not isinstance(item[key], int) or isinstance(item[key], bool) or item[key] < 1:
                        raise ConfigError(f"config key {where}.{key}: {item[key]!r} must be an integer >= 1")
                    values[key] = item[key]
            specs += [{"type": item["type"], "layers": values["layers"], "components": values["components"]}
                      for _ in range(values["count"])]
        if not specs:
            raise ConfigError("config key model.flow.blocks: the list of blocks is empty")
        later = [k for k, spec in enumerate(specs) if spec["type"] == "mixd" and k > 0]
        if later:
            raise ConfigError(f"config key model.flow.blocks: a 'mixd' block may only be the first block (its "
                              f"components are the codebook's, so it must read u directly); found at block {later[0]}")
        return specs


@dataclass
class BackboneConfig:
    """A plain transformer backbone (used by the AR and MDLM baselines)."""

    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def validate(self, name: str = "model") -> None:
        for key in ("width", "depth", "heads", "mlp_ratio"):
            positive(f"{name}.{key}", getattr(self, key))
        divides(name, self.width, self.heads)


@dataclass
class PriorPairsConfig:
    """Prior pairs for Stage B (issue #8): a share of every batch are pairs (z ~ N(0, tau^2 I), x* = decode(f^{-1}(z)))
    drawn from a pool that the flow's exact inverse refills every `refresh_every` steps."""

    fraction: float = 0.0  # share of each batch's rows that are prior pairs (0 turns them off)
    pool: int = 512  # pairs in the pool
    refresh_every: int = 100  # training steps between refills
    tau: float = 1.0  # prior scale of the pool's z
    inverse: str = "sequential"  # sequential (KV-cached) | jacobi (parallel sweeps, see models/tarflow.py)
    tol: float = 1e-4  # jacobi: stop a block's sweeps when no entry moved more than this
    max_sweeps: int | None = None  # jacobi: sweeps per block at most (null: T, where the inverse is exact)

    CHOICES = {"inverse": ("sequential", "jacobi")}

    def validate(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ConfigError(f"config key model.generator.prior.fraction: {self.fraction} must be in [0, 1]")
        positive("model.generator.prior.pool", self.pool)
        positive("model.generator.prior.refresh_every", self.refresh_every)
        positive("model.generator.prior.tau", self.tau)
        if self.tol < 0:
            raise ConfigError(f"config key model.generator.prior.tol: {self.tol} must be >= 0")
        if self.max_sweeps is not None:
            positive("model.generator.prior.max_sweeps", self.max_sweeps)


@dataclass
class GeneratorConfig(BackboneConfig):
    """Stage B: the one-step generator G (z -> logits), a bidirectional transformer: a backbone (width, depth,
    heads, mlp_ratio, dropout) plus the options below."""

    positions: str = "learned"  # learned | rotary
    deterministic_u: bool = False  # train on z = f(mu_x) instead of z = f(u), u ~ q(.|x) fresh at every visit
    align_lambda: float = 0.0  # weight of the alignment loss (0 turns it off)
    align_target: str = "latents"  # latents (v_{K-j} along the inverse path) | hidden (flow block hidden states)
    # [generator layer (1..depth), j (1..K)] pairs; empty: pair layer round(j * depth / K) with j = 1..K
    align_pairs: list[list[int]] = field(default_factory=list)
    prior: PriorPairsConfig = field(default_factory=PriorPairsConfig)  # prior pairs in the batch (issue #8)

    CHOICES = {"positions": ("learned", "rotary"), "align_target": ("latents", "hidden")}

    def validate(self, flow_blocks: int) -> None:  # type: ignore[override]
        super().validate("model.generator")
        self.prior.validate()
        if self.align_lambda < 0:
            raise ConfigError(f"config key model.generator.align_lambda: {self.align_lambda} must be >= 0")
        for pair in self.align_pairs:
            if len(pair) != 2 or not 1 <= pair[0] <= self.depth or not 1 <= pair[1] <= flow_blocks:
                raise ConfigError(f"config key model.generator.align_pairs: {pair} must be [layer, j] with "
                                  f"1 <= layer <= {self.depth} and 1 <= j <= {flow_blocks}")

    def pairs(self, flow_blocks: int) -> list[tuple[int, int]]:
        """(generator layer, j) pairs: layer l learns the state the exact inverse reaches after j blocks."""
        if self.align_pairs:
            return [(int(a), int(b)) for a, b in self.align_pairs]
        return [(max(1, round(j * self.depth / flow_blocks)), j) for j in range(1, flow_blocks + 1)]


@dataclass
class ModelConfig:
    flow: FlowConfig = field(default_factory=FlowConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    ar: BackboneConfig = field(default_factory=BackboneConfig)
    mdlm: BackboneConfig = field(default_factory=BackboneConfig)

    def validate(self) -> None:
        self.flow.validate()
        self.generator.validate(self.flow.num_blocks())
        self.ar.validate("model.ar")
        self.mdlm.validate("model.mdlm")


@dataclass
class TrainConfig:
    batch_size: int = 32  # the global batch, whatever the number of processes
    micro_batch_size: int | None = None  # per-process micro-batch; gradients accumulate up to the batch
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    max_steps: int = 1000
    max_minutes: float | None = None  # stop early after this much training time (a time budget)
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    bf16: bool = False  # bf16 autocast (flow affine steps and log-dets stay float32)
    compile: bool = False  # torch.compile the model
    eval_every: int = 200  # validation estimate every N steps (0: only at the end)
    eval_batches: int = 8  # batches of validation windows for that estimate
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 3  # checkpoints kept
    max_nonfinite: int = 20  # stop after this many non-finite losses in a row
    ema: float | None = None  # decay of an EMA of the weights (e.g. 0.999), used for evaluation and sampling
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # per-model overrides of the keys above, e.g. {"max_steps": 500}
    flow: dict[str, Any] = field(default_factory=dict)
    generator: dict[str, Any] = field(default_factory=dict)
    ar: dict[str, Any] = field(default_factory=dict)
    mdlm: dict[str, Any] = field(default_factory=dict)
    # the judge that `onestep-lm run` trains (an AR model, model.ar): overrides applied on top of train.ar's
    judge: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        self._check_ranges()
        for kind in OVERRIDE_SECTIONS:
            self.for_model(kind)  # the overrides are checked like any key

    def _check_ranges(self) -> None:
        positive("train.batch_size", self.batch_size)
        positive("train.lr", self.lr)
        positive("train.max_steps", self.max_steps)
        positive("train.log_every", self.log_every)
        positive("train.checkpoint_every", self.checkpoint_every)
        positive("train.keep_last", self.keep_last)
        positive("train.max_nonfinite", self.max_nonfinite)
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise ConfigError("config keys train.warmup_steps and train.eval_every must be >= 0")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"config key train.ema: {self.ema} must be null (no EMA) or a decay in (0, 1), "
                              "e.g. 0.999")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"config key train.min_lr_ratio: {self.min_lr_ratio} must be in [0, 1]")
        if len(self.betas) != 2:
            raise ConfigError(f"config key train.betas: {self.betas} must be two numbers")

    def for_model(self, kind: str) -> "TrainConfig":
        """This config with the overrides of one model kind applied (overrides are checked like any key)."""
        overrides = getattr(self, kind)
        merged = {k: v for k, v in dataclasses.asdict(self).items() if k not in OVERRIDE_SECTIONS}
        for key, value in overrides.items():
            if key not in merged:
                raise ConfigError(f"unknown config key 'train.{kind}.{key}'; allowed keys: {', '.join(merged)}")
            merged[key] = value
        cfg = build(TrainConfig, merged, "train." + kind)
        cfg._check_ranges()
        return cfg


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.data.validate()
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict:
        return to_plain(self)

    def save(self, path: Path) -> None:
        from .io import write_text_atomic

        write_text_atomic(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: Config | None = None) -> Config:
    """Read a YAML config (or start from `base`, or the defaults), apply `key=value` overrides, validate."""
    raw: dict = base.to_dict() if base is not None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> Config:
    return build(Config, raw, "").validate()


def apply_override(raw: dict, item: str) -> None:
    """Set one `a.b.c=value` in a raw config mapping (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=3e-4)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
