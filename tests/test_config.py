"""Typed configs: YAML, overrides, and errors that name the key and the allowed values."""

import pytest

from onestep_lm.config import load_config
from onestep_lm.errors import ConfigError

from conftest import ROOT, TINY


def test_shipped_configs_load():
    for name in ("tiny", "shakespeare", "text8"):
        path = ROOT / "configs" / f"{name}.yaml"
        if name == "text8" and not path.exists():
            pytest.skip("text8 config not shipped yet")
        load_config(path)


def test_overrides_apply_and_per_model_train_keys_merge():
    cfg = load_config(TINY, ["train.lr=1e-4", "train.generator.max_steps=7", "model.flow.blocks=3"])
    assert cfg.train.lr == 1e-4 and cfg.model.flow.blocks == 3
    assert cfg.train.for_model("generator").max_steps == 7
    assert cfg.train.for_model("flow").max_steps == cfg.train.max_steps


@pytest.mark.parametrize("override, words", [
    ("model.flow.widht=3", ["model.flow.widht", "allowed keys", "width"]),
    ("train.batch_size=abc", ["train.batch_size", "integer"]),
    ("data.source=wiki", ["data.source", "shakespeare", "text8"]),
    ("train.flow.foo=1", ["train.flow.foo", "max_steps"]),
    ("model.flow.heads=3", ["model.flow.heads", "divide"]),
    ("data.source=text", ["data.path", "required"]),
    ("train", ["key=value"]),
])
def test_bad_config_names_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(TINY)
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").to_dict() == cfg.to_dict()


def test_learning_rate_schedule_follows_the_budget_that_runs_out_first():
    from onestep_lm.train.trainer import lr_at

    cfg = load_config(TINY, ["train.lr=1.0", "train.min_lr_ratio=0.1", "train.warmup_steps=10",
                             "train.max_steps=110"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    timed = load_config(TINY, ["train.lr=1.0", "train.min_lr_ratio=0.1", "train.warmup_steps=10",
                               "train.max_steps=110", "train.max_minutes=1"]).train
    assert lr_at(20, timed, elapsed=0.0) == pytest.approx(lr_at(20, cfg))
    assert lr_at(20, timed, elapsed=30.0) == pytest.approx(0.55)  # half the time used: half the decay
    assert lr_at(20, timed, elapsed=60.0) == pytest.approx(0.1)
