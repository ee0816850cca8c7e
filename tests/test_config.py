"""Configuration layering: TOML values, --set parsing, type checks, presets."""

from __future__ import annotations

import tomllib

import pytest

from capsbench.core.config import deep_merge, from_dict, parse_sets, to_toml
from capsbench.core.errors import CapsbenchError
from capsbench.train.config import TrainConfig, load_presets, train_config


def test_parse_sets_nests_and_types_values():
    got = parse_sets(["train.steps=5", "affine.rotation=[0, 10]", "models=capsnet", "x.flag=true", "a.b.c=0.5"])
    assert got == {"train": {"steps": 5}, "affine": {"rotation": [0, 10]}, "models": "capsnet",
                   "x": {"flag": True}, "a": {"b": {"c": 0.5}}}  # fmt: skip


def test_parse_sets_refuses_missing_equals():
    with pytest.raises(CapsbenchError, match="expected key=value"):
        parse_sets(["train.steps"])


def test_from_dict_types():
    cfg = from_dict(TrainConfig, {"lr": 1, "steps": 7})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.steps == 7
    with pytest.raises(CapsbenchError, match="steps: expected int"):
        from_dict(TrainConfig, {"steps": 1.5})
    with pytest.raises(CapsbenchError, match="compile: expected bool"):
        from_dict(TrainConfig, {"compile": 1})


def test_deep_merge_keeps_siblings():
    assert deep_merge({"a": {"x": 1, "y": 2}, "b": 3}, {"a": {"y": 5}}) == {"a": {"x": 1, "y": 5}, "b": 3}


def test_every_preset_is_a_valid_train_config():
    for name in load_presets():
        assert train_config(name).steps > 0


def test_overrides_apply_over_preset():
    cfg = train_config("smoke", steps=3, seed=9)
    assert (cfg.steps, cfg.seed, cfg.batch_size) == (3, 9, load_presets()["smoke"]["batch_size"])


def test_to_toml_round_trips():
    data = {"suite": "x", "n": 3, "f": 0.5, "flag": False, "lst": [1, 2], "t": {"a": "b", "u": {"k": [0.1]}}}
    assert tomllib.loads(to_toml(data)) == data


def test_to_toml_refuses_none_with_its_key():
    with pytest.raises(ValueError, match=r"cannot write train\.seed = None"):
        to_toml({"train": {"seed": None}})
    with pytest.raises(ValueError, match=r"models\[1\]"):
        to_toml({"models": ["capsnet", None]})


def test_vocabularies_and_bounds_are_checked_where_a_dict_becomes_a_dataclass():
    with pytest.raises(CapsbenchError, match="train.amp must be one of auto, fp32, bf16, got 'fp16'"):
        from_dict(TrainConfig, {"amp": "fp16"}, where="train")
    with pytest.raises(CapsbenchError, match="train.augment must be one of shift, canvas, none"):
        from_dict(TrainConfig, {"augment": "rotate"}, where="train")
    with pytest.raises(CapsbenchError, match=r"train.lr_decay must be <= 1, got 1.5"):
        from_dict(TrainConfig, {"lr_decay": 1.5}, where="train")
    with pytest.raises(CapsbenchError, match=r"train.lr must be > 0, got nan"):
        from_dict(TrainConfig, {"lr": float("nan")}, where="train")
    assert from_dict(TrainConfig, {"amp": "off"}).amp == "fp32"  # the older spelling, one vocabulary


def test_speed_options_stay_out_of_the_weight_key():
    from capsbench.models import weight_options

    fast = weight_options("capsnet", {"primary_conv": "spectral", "routing_impl": "parent-major", "routing_chunk": 8})
    plain = weight_options("capsnet", {"primary_conv": "direct", "routing_impl": "plain"})
    assert fast == plain and "primary_conv" not in fast and "routing_iters" in fast
    assert weight_options("capsnet", {"routing_iters": 1}) != plain
    base = TrainConfig().weight_key()
    assert TrainConfig(compile=True, channels_last=True, log_every=7).weight_key() == base
    assert TrainConfig(lr=2e-3).weight_key() != base
