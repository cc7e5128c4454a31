"""Judges: language models that score sample texts (METHOD.md, "Metrics").

A judge re-tokenises each text with its own tokenizer and returns the negative log-likelihood of every
token of it, in nats, summed in float64 (the network runs in its own dtype; log-softmax and sums are float64).

- `RunJudge`: an AR run folder of this library. Its NLL of a text is the AR model's exact -log p(x), the first
  token included (conditioned on the learned BOS). A text longer than the model's window is cut into
  non-overlapping windows, each scored from BOS (the context resets at each window start).
- `HFJudge` (`hf:PATH_OR_NAME`): any causal LM that `transformers` loads locally (the optional extra
  `onestep-lm[hf]`; nothing is downloaded). Each window of a text is prefixed with the tokenizer's BOS token
  (or, failing that, its EOS token, as GPT-2 uses), so that the first token is scored too; without either, the
  first token of each window is conditioned on nothing and left unscored (reported in `unscored_tokens`).

Figures: bits per token (of the judge's tokenizer), bits per character of the texts, and generative
perplexity exp(total NLL / total scored tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError, RunError

LN2 = math.log(2)
POSITIONS_PER_STEP = 256  # positions whose logits are taken to float64 at once


@dataclass
class JudgeScores:
    """Per-text NLL (nats, float64), scored tokens and characters."""

    nats: np.ndarray
    tokens: np.ndarray
    chars: np.ndarray
    unscored_tokens: int = 0

    def summary(self) -> dict:
        nats, tokens, chars = float(self.nats.sum()), int(self.tokens.sum()), int(self.chars.sum())
        return {"bits_per_token": nats / LN2 / tokens if tokens else float("nan"),
                "bits_per_char": nats / LN2 / chars if chars else float("nan"),
                "gen_perplexity": math.exp(nats / tokens) if tokens else float("nan"),
                "judge_tokens": tokens, "chars": chars, "unscored_tokens": self.unscored_tokens}


def _windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)] if ids else []


def _score_batches(windows: list[tuple[int, list[int]]], n_texts: int, batch_size: int, logits_fn,
                   shifted: bool) -> tuple[np.ndarray, np.ndarray]:
    """NLL (nats, float64) and scored tokens per text, from windows (text index, ids) run in right-padded batches
    through logits_fn(ids, mask) -> (B, T, V) logits. shifted=False: logits[:, t] is the distribution of ids[:, t]
    (the model supplies its own start, as ARLM's BOS). shifted=True: logits[:, t] is that of ids[:, t + 1] (the
    transformers convention) and ids[:, 0] is a prefix token, not scored."""
    nats = np.zeros(n_texts, dtype=np.float64)
    tokens = np.zeros(n_texts, dtype=np.int64)
    order = sorted(range(len(windows)), key=lambda i: len(windows[i][1]))  # similar lengths batch together
    for start in range(0, len(order), batch_size):
        chunk = [windows[i] for i in order[start:start + batch_size]]
        T = max(len(w) for _, w in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.bool)
        for row, (_, w) in enumerate(chunk):
            ids[row, :len(w)] = torch.tensor(w)
            mask[row, :len(w)] = True
        logits = logits_fn(ids, mask)
        if shifted:  # predictions at 0..T-2 for targets 1..T-1
            target, keep, logits = ids[:, 1:], mask[:, 1:], logits[:, :-1]
        else:
            target, keep = ids, mask
        for row, (text_index, _) in enumerate(chunk):
            for p in range(0, target.shape[1], POSITIONS_PER_STEP):  # float64 (positions, V) slices: bounded memory
                lp = logits[row, p:p + POSITIONS_PER_STEP].double()
                t = target[row, p:p + POSITIONS_PER_STEP]
                token_nll = torch.logsumexp(lp, dim=-1) - lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
                kept = keep[row, p:p + POSITIONS_PER_STEP]
                nats[text_index] += torch.where(kept, token_nll, 0.0).sum().item()
            tokens[text_index] += int(keep[row].sum())
    return nats, tokens


class RunJudge:
    """An AR run of this library as the judge: its exact NLL of each text."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", batch_size: int = 64):
        from ..runs import open_run

        self.run = open_run(run_dir, device=device)
        if self.run.kind != "ar":
            raise RunError(f"a judge run must be an AR run; {run_dir} is a {self.run.kind} run")
        self.name = str(Path(run_dir))
        self.kind = "ar-run"
        self.batch_size = batch_size
        self.window = self.run.config.data.seq_len

    @torch.no_grad()
    def score(self, texts: list[str]) -> JudgeScores:
        model, device = self.run.model.eval(), self.run.device
        windows = []
        for i, text in enumerate(texts):
            try:
                ids = self.run.tokenizer.encode(text)
            except DataError as e:
                raise DataError(f"the judge's tokenizer cannot encode sample {i}: {e}") from None
            windows += [(i, w) for w in _windows(ids, self.window)]

        def logits_fn(ids, mask):  # position t of ARLM.logits predicts ids[t] from BOS and ids[<t]
            return model.logits(ids.to(device)).cpu()

        nats, tokens = _score_batches(windows, len(texts), self.batch_size, logits_fn, shifted=False)
        return JudgeScores(nats, tokens, np.array([len(t) for t in texts]))

    def describe(self) -> dict:
        return {"judge": self.name, "judge_kind": self.kind, "judge_parameters": self.run.meta.get("parameters"),
                "judge_window": self.window}


class HFJudge:
    """A causal LM loaded locally by `transformers` (optional extra), with its own tokenizer."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 8):
        try:
            import transformers
        except ImportError:
            raise ConfigError("a hf: judge needs the optional extra: pip install 'onestep-lm[hf]' "
                              "(the transformers library)") from None
        self.name, self.kind, self.batch_size, self.device = f"hf:{path}", "hf", batch_size, device
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise RunError(f"transformers cannot load a causal LM and its tokenizer from {path!r} locally: "
                           f"{str(e).splitlines()[0]}") from None
        self.model.to(device).eval()
        cfg = self.model.config
        self.window = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024
        tok = self.tokenizer
        self.prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @torch.no_grad()
    def score(self, texts: list[str]) -> JudgeScores:
        size = self.window - 1 if self.prefix is not None else self.window
        windows, unscored = [], 0
        for i, text in enumerate(texts):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for w in _windows(list(ids), size):
                if self.prefix is None:
                    unscored += 1
                windows.append((i, ([self.prefix] if self.prefix is not None else []) + w))

        def logits_fn(ids, mask):
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.long().to(self.device))
            return out.logits.cpu()

        # the prediction of token t + 1 sits at position t: scoring starts at the second input position
        nats, tokens = _score_batches(windows, len(texts), self.batch_size, logits_fn, shifted=True)
        return JudgeScores(nats, tokens, np.array([len(t) for t in texts]), unscored)

    def describe(self) -> dict:
        return {"judge": self.name, "judge_kind": self.kind,
                "judge_parameters": sum(p.numel() for p in self.model.parameters()), "judge_window": self.window}


def load_judge(spec: str | Path, device: str = "cpu") -> RunJudge | HFJudge:
    """`hf:PATH_OR_NAME` for a transformers causal LM, else the folder of an AR run of this library."""
    spec = str(spec)
    if spec.startswith("hf:"):
        if not spec[3:]:
            raise ConfigError("--judge hf: needs a path or name after 'hf:'")
        return HFJudge(spec[3:], device=device)
    return RunJudge(spec, device=device)

