"""Sample quality of one sampler setting of a run: draw n samples, score them under a judge, compute the text
metrics of evaluation/samples.py, and the same figures for n real validation windows of the same length.

Samples are drawn in chunks of `batch_size`; chunk i is drawn with seed + i, so the first samples do not
depend on n. The reference windows are n windows of the validation split at evenly spaced offsets.
Results go to RUN/eval.json under "samples", one entry per setting label (e.g. "mdlm steps=16 T=1").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..data import load_corpus, prepare_data
from ..errors import ConfigError, DataError
from ..io import read_json, write_json
from ..runs import Run
from ..sampling import DEFAULT_TEMPERATURE, SAMPLERS, sample_tokens
from .samples import MAX_INDEX_TOKENS, TrainingIndex, clean, text_metrics

N_EXAMPLES = 3  # sample texts kept in the results


@dataclass(frozen=True)
class Setting:
    """One way of sampling a run: the sampler, its step count (mdlm), softmax temperature and prior scale tau."""

    sampler: str
    steps: int | None = None
    temperature: float | None = None
    tau: float = 1.0

    @property
    def label(self) -> str:
        parts = [self.sampler]
        if self.steps is not None:
            parts.append(f"steps={self.steps}")
        if self.sampler == "flow-inverse" or self.tau != 1.0:
            parts.append(f"tau={self.tau:g}")
        if self.sampler != "flow-inverse":
            t = self.temperature if self.temperature is not None else DEFAULT_TEMPERATURE.get(self.sampler, 0.0)
            parts.append(f"T={t:g}")
        return " ".join(parts)

    def options(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "temperature": self.temperature, "tau": self.tau}

    def with_temperature(self, value: float) -> "Setting":
        """The same setting at another temperature (the prior scale tau for the flow's exact inverse)."""
        if self.sampler == "flow-inverse":
            return Setting(self.sampler, self.steps, self.temperature, value)
        return Setting(self.sampler, self.steps, value, self.tau)


def default_mdlm_steps(length: int) -> list[int]:
    """1, 4, 16, 64, ... below the length, and the length itself."""
    steps, k = [], 1
    while k < length:
        steps.append(k)
        k *= 4
    return steps + [length]


def sampler_settings(kind: str, length: int, mdlm_steps: list[int] | None = None) -> list[Setting]:
    """The settings a run of `kind` is compared at: one-step at temperature 0 and 1 and the flow's exact
    inverse (generator), the exact inverse (flow), AR at temperature 1, MDLM at several step counts."""
    if kind == "generator":
        return [Setting("onestep", temperature=0.0), Setting("onestep", temperature=1.0), Setting("flow-inverse")]
    if kind == "flow":
        return [Setting("flow-inverse")]
    if kind == "ar":
        return [Setting("ar", temperature=1.0)]
    if kind == "mdlm":
        steps = sorted({min(s, length) for s in (mdlm_steps or default_mdlm_steps(length))})
        return [Setting("mdlm", steps=s, temperature=1.0) for s in steps]
    raise ConfigError(f"unknown run kind {kind!r}")


def sweep_settings(kind: str, length: int, values: list[float]) -> list[Setting]:
    """The temperature sweep of each sampler of a run (tau for the flow's inverse; MDLM at `length` steps)."""
    base = {"generator": [Setting("onestep"), Setting("flow-inverse")], "flow": [Setting("flow-inverse")],
            "ar": [Setting("ar")], "mdlm": [Setting("mdlm", steps=length)]}[kind]
    return [b.with_temperature(v) for b in base for v in values]


class DataContext:
    """What the text metrics need from a run's data: the training split's index and words, validation windows."""

    _cache: dict = {}

    def __init__(self, run: Run):
        data = prepare_data(run.config.data, tokenizer=run.tokenizer)
        self.tokenizer = run.tokenizer
        self.val = np.asarray(data.splits["val"].tokens)
        self.index = TrainingIndex(np.asarray(data.splits["train"].tokens[:MAX_INDEX_TOKENS]))
        self.vocabulary = None
        if run.tokenizer.kind == "char":
            self.vocabulary = set(load_corpus(run.config.data).splits["train"].split())

    @classmethod
    def of(cls, run: Run) -> "DataContext":
        key = (repr(run.config.data), run.tokenizer.fingerprint())
        if key not in cls._cache:
            cls._cache[key] = cls(run)
        return cls._cache[key]

    def windows(self, n: int, length: int) -> list[np.ndarray]:
        """n validation windows of `length` tokens at evenly spaced offsets."""
        if len(self.val) < length:
            raise DataError(f"the validation split holds {len(self.val)} tokens, fewer than one window of {length}")
        starts = np.linspace(0, len(self.val) - length, n).round().astype(int)
        return [self.val[s:s + length].astype(np.int64) for s in starts]


def draw(run: Run, setting: Setting, n: int, seed: int, length: int, batch_size: int = 64) -> torch.Tensor:
    """n samples (n, length) of a setting, chunk i of `batch_size` drawn with seed + i."""
    chunks = [sample_tokens(run, min(batch_size, n - start), seed=seed + i, seq_len=length, **setting.options())
              for i, start in enumerate(range(0, n, batch_size))]
    return torch.cat(chunks).cpu()


def score_texts(ids: list, texts: list[str], judge, ctx: DataContext) -> dict:
    return {"judge": clean({**judge.describe(), **judge.score(texts).summary()}),
            **clean(text_metrics(ids, texts, index=ctx.index, vocabulary=ctx.vocabulary))}


_reference_cache: dict = {}


def data_reference(run: Run, judge, n: int, length: int) -> dict:
    """The figures of n real validation windows of `length` tokens (cached per data, judge, n and length)."""
    ctx = DataContext.of(run)
    key = (id(ctx), judge.name, n, length)
    if key not in _reference_cache:
        windows = ctx.windows(n, length)
        texts = [run.tokenizer.decode(w.tolist()) for w in windows]
        _reference_cache[key] = {"source": "val windows at evenly spaced offsets", "n": n, "length": length,
                                 **score_texts([w.tolist() for w in windows], texts, judge, ctx)}
    return _reference_cache[key]


def evaluate_samples(run: Run, judge, setting: Setting, n: int = 64, seed: int = 0, length: int | None = None,
                     batch_size: int = 64, reference: bool = True) -> dict:
    """Every sample figure of one setting (with n and seed), and the data's figures beside them."""
    if setting.sampler not in SAMPLERS[run.kind]:
        raise ConfigError(f"sampler {setting.sampler!r} is not available for a {run.kind} run")
    if n < 1:
        raise ConfigError(f"number of judged samples must be >= 1, got {n}")
    length = length or run.config.data.seq_len
    if not 1 <= length <= run.config.data.seq_len:
        raise ConfigError(f"sample length {length} must be between 1 and the run's seq_len {run.config.data.seq_len}")
    started = time.perf_counter()
    tokens = draw(run, setting, n, seed, length, batch_size)
    sampling_s = time.perf_counter() - started
    ids = [t.tolist() for t in tokens]
    texts = [run.tokenizer.decode(t) for t in ids]
    result = {"setting": setting.label, **asdict(setting), "n": n, "seed": seed, "length": length,
              **score_texts(ids, texts, judge, DataContext.of(run)),
              "examples": texts[:N_EXAMPLES], "sampling_seconds": round(sampling_s, 3)}
    if setting.sampler == "mdlm":
        result["last_batch_nfe"] = run.model.last_sample_nfe
    if reference:
        result["data"] = data_reference(run, judge, n, length)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def write_sample_eval(run: Run, result: dict) -> None:
    """Merge one setting's result into RUN/eval.json under "samples" (other entries are kept)."""
    path = run.dir / "eval.json"
    existing = read_json(path) if path.is_file() else {}
    if not isinstance(existing.get("samples"), dict):  # an old eval.json kept the importance-sample count here
        existing["samples"] = {}
    existing["samples"][result["setting"]] = result
    write_json(path, existing)


def format_samples(result: dict) -> str:
    j, d = result["judge"], result.get("data", {})
    dj = d.get("judge", {})

    def f(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    lines = [f"{result['setting']}: {result['n']} samples of {result['length']} tokens, seed {result['seed']}; "
             f"judge {j['judge']}",
             f"  judge NLL {f(j['bits_per_token'], '.4f')} bits/token, {f(j['bits_per_char'], '.4f')} bits/char, "
             f"gen. perplexity {f(j['gen_perplexity'])} (data: {f(dj.get('gen_perplexity'))})",
             f"  unigram entropy {f(result['unigram_entropy_nats'])} nats (data: {f(d.get('unigram_entropy_nats'))})"]
    if "word_validity" in result:
        lines.append(f"  word validity {f(result['word_validity'])} (data: {f(d.get('word_validity'))})")
    c, dc = result["copying"], d.get("copying", {})
    lines += [f"  distinct-1/2/3 {f(result['distinct_1'])}/{f(result['distinct_2'])}/{f(result['distinct_3'])}, "
              f"repetition {f(result['repetition_rate'])}",
              f"  8-grams in train {f(c['ngram_overlap_8'])} (data: {f(dc.get('ngram_overlap_8'))}), longest shared "
              f"substring mean {f(c['longest_shared_mean'], '.1f')} max {c['longest_shared_max']} tokens"]
    return "\n".join(lines)
