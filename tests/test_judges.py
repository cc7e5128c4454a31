"""Judges: an AR run's judge NLL equals the AR model's own exact NLL (window by window, in padded batches); a
tiny randomly initialised GPT-2 built offline as an `hf:` judge equals a manual float64 computation; `eval
--judge` writes the sample figures (with n and seed) into eval.json."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from onestep_lm.cli import main
from onestep_lm.data import prepare_data
from onestep_lm.errors import ConfigError, RunError
from onestep_lm.evaluation.judges import RunJudge, load_judge

GPT2_FILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2_bpe"


def val_texts(run_dir, lengths):
    judge = RunJudge(run_dir)
    data = prepare_data(judge.run.config.data, tokenizer=judge.run.tokenizer)
    val = np.asarray(data.splits["val"].tokens)
    texts, start = [], 0
    for n in lengths:
        texts.append(judge.run.tokenizer.decode(val[start:start + n].tolist()))
        start += n
    return judge, texts


def test_ar_run_judge_equals_the_models_own_nll(tiny_ar):
    judge, texts = val_texts(tiny_ar, [32, 32, 5, 70])  # the window is 32: the last text is cut 32 + 32 + 6
    scores = judge.score(texts)
    model, tok = judge.run.model, judge.run.tokenizer
    for i, text in enumerate(texts):
        ids = torch.tensor(tok.encode(text))
        expected = sum(model.nll(ids[s:s + 32][None]).double().item() for s in range(0, len(ids), 32))
        assert scores.nats[i] == pytest.approx(expected, rel=1e-5)
        assert scores.tokens[i] == len(ids) and scores.chars[i] == len(text)
    s = scores.summary()
    total = scores.nats.sum()
    assert s["bits_per_token"] == pytest.approx(total / math.log(2) / (32 + 32 + 5 + 70))
    assert s["bits_per_char"] == pytest.approx(s["bits_per_token"])  # character tokens
    assert s["gen_perplexity"] == pytest.approx(math.exp(total / 139))


def test_judge_must_be_an_ar_run(tiny_mdlm):
    with pytest.raises(RunError, match="AR run"):
        load_judge(tiny_mdlm)


def test_eval_judge_writes_sample_figures(tiny_mdlm, tiny_ar, capsys):
    assert main(["eval", "--run", str(tiny_mdlm), "--judge", str(tiny_ar), "--samples", "6", "--sampler", "mdlm",
                 "--steps", "4", "--seed", "3"]) == 0
    entry = json.loads((tiny_mdlm / "eval.json").read_text())["samples"]["mdlm steps=4 T=1"]
    assert entry["n"] == 6 and entry["seed"] == 3 and entry["length"] == 32
    assert entry["judge"]["judge"] == str(tiny_ar) and entry["judge"]["judge_tokens"] == 6 * 32
    assert entry["judge"]["gen_perplexity"] > 1
    for key in ("unigram_entropy_nats", "distinct_1", "distinct_2", "distinct_3", "repetition_rate",
                "word_validity"):
        assert key in entry and key in entry["data"]
    assert 0 <= entry["copying"]["ngram_overlap_8"] <= 1 and entry["data"]["n"] == 6
    assert entry["data"]["word_validity"] > 0.5  # real text: most words are words of the training text
    assert "judge NLL" in capsys.readouterr().out
    # --samples is the judged-sample count; without --judge it is refused with a pointer to --iw-samples
    assert main(["eval", "--run", str(tiny_mdlm), "--samples", "4"]) == 2
    assert "--iw-samples" in capsys.readouterr().err


def test_hf_judge_reports_a_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match=r"onestep-lm\[hf\]"):
        load_judge("hf:anything")


def tiny_gpt2(folder: Path, n_positions: int = 8):
    """A randomly initialised 1-layer GPT-2 and a tokenizer, saved offline into `folder`."""
    transformers = pytest.importorskip("transformers")
    if (GPT2_FILES / "encoder.json").is_file():
        tok = transformers.GPT2TokenizerFast.from_pretrained(
            str(GPT2_FILES), vocab_file=str(GPT2_FILES / "encoder.json"), merges_file=str(GPT2_FILES / "vocab.bpe"))
    else:  # a byte-level BPE trained here
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        raw.train_from_iterator(["the king and the queen of the land"] * 20, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>",
                                                   eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=n_positions, vocab_size=len(tok),
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def test_hf_judge_equals_a_manual_float64_computation(tmp_path, tiny_ar):
    model, tok = tiny_gpt2(tmp_path / "gpt2")
    judge = load_judge(f"hf:{tmp_path / 'gpt2'}")
    texts = ["First Citizen:\nBefore we proceed any further, hear me speak.", "the king", "All:\nSpeak, speak."]
    scores = judge.score(texts)
    prefix = tok.bos_token_id
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        expected, count = 0.0, 0
        for s in range(0, len(ids), 7):  # n_positions 8: windows of 7 tokens after the BOS
            x = torch.tensor([prefix] + ids[s:s + 7])
            with torch.no_grad():
                logits = model(x[None]).logits[0].double()
            expected -= torch.log_softmax(logits[:-1], -1).gather(-1, x[1:, None]).sum().item()
            count += len(x) - 1
        assert scores.nats[i] == pytest.approx(expected, rel=1e-6)
        assert scores.tokens[i] == count == len(ids)
    assert len(tok(texts[0], add_special_tokens=False)["input_ids"]) > 7  # spans two windows
    # and through the command line, on a tiny AR run's samples
    assert main(["eval", "--run", str(tiny_ar), "--judge", f"hf:{tmp_path / 'gpt2'}", "--samples", "4"]) == 0
    entry = json.loads((tiny_ar / "eval.json").read_text())["samples"]["ar T=1"]
    assert entry["judge"]["judge_kind"] == "hf" and entry["n"] == 4 and entry["judge"]["judge_tokens"] > 0
