"""Tests of fedlora.config: schema, defaults, type and value checks, overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedlora import config
from fedlora.errors import ConfigError

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


@pytest.fixture(scope="module")
def declared() -> dict[str, Any]:
    """The flattened ``[tool.flwr.app.config]`` of pyproject.toml."""
    with PYPROJECT.open("rb") as f:
        return _flatten(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


# ----------------------------------------------------------------------------- defaults


def test_defaults_equal_pyproject_declaration(declared: dict[str, Any]) -> None:
    # Prepare
    defaults = config.defaults()

    # Assert: same keys, same values, same types (16.0 is not 16)
    assert sorted(defaults) == sorted(declared)
    assert {k: (type(v), v) for k, v in defaults.items()} == {
        k: (type(v), v) for k, v in declared.items()
    }


def test_pyproject_declaration_is_a_valid_config(declared: dict[str, Any]) -> None:
    assert config.to_flat(config.from_flat(declared)) == declared


def test_from_flat_empty_gives_defaults() -> None:
    cfg = config.from_flat({})

    assert cfg == config.RunConfig()
    assert config.to_flat(cfg) == config.defaults()
    assert cfg.lora.r == 8
    assert cfg.fl.strategy == "fedit"
    assert cfg.data.source == "bbc-news"


def test_schema_has_help_for_every_key() -> None:
    schema = config.schema()

    assert set(schema) == set(config.defaults())
    assert all(isinstance(help_, str) and help_ for _, _, help_ in schema.values())


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_key_lists_valid_keys_and_suggests_close_match() -> None:
    with pytest.raises(ConfigError) as excinfo:
        config.from_flat({"lora.rank": 8})

    message = str(excinfo.value)
    assert "'lora.rank'" in message
    assert "did you mean 'lora.r'?" in message
    assert "Valid keys:" in message
    for key in config.defaults():
        assert key in message


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as excinfo:
        config.from_flat({"zzzzzzzzzz": 1})

    assert "did you mean" not in str(excinfo.value)
    assert "'zzzzzzzzzz'" in str(excinfo.value)


def test_unknown_key_is_rejected_even_with_valid_keys() -> None:
    with pytest.raises(ConfigError, match="strategyy"):
        config.from_flat({"strategy": "flora", "strategyy": "flora"})


# ----------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("key", "value", "expected_type"),
    [
        ("lora.r", "8", "int"),
        ("lora.r", True, "int"),
        ("lora.r", 2.5, "int"),
        ("num-server-rounds", False, "int"),
        ("lora.alpha", "16", "float"),
        ("lora.alpha", True, "float"),
        ("lora.use-rslora", 1, "bool"),
        ("lora.use-rslora", "true", "bool"),
        ("strategy", 3, "str"),
        ("data.path", None, "str"),
    ],
)
def test_wrong_type_is_rejected(key: str, value: Any, expected_type: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config.from_flat({key: value})

    message = str(excinfo.value)
    assert repr(key) in message
    assert f"expects {expected_type}" in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lora.alpha", 32, 32.0),  # int accepted for float
        ("train.lr", 1, 1.0),
        ("lora.r", 4.0, 4),  # an integral float is accepted for int
        ("lora.r", 4, 4),
        ("lora.use-rslora", True, True),
    ],
)
def test_accepted_types_are_normalised(key: str, value: Any, expected: Any) -> None:
    flat = config.to_flat(config.from_flat({key: value}))

    assert flat[key] == expected
    assert type(flat[key]) is type(expected)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("flat", "fragment"),
    [
        ({"lora.r": 0}, "lora.r must be > 0"),
        ({"lora.r": -1}, "lora.r must be > 0"),
        ({"lora.alpha": 0.0}, "lora.alpha must be > 0"),
        ({"lora.dropout": 1.0}, "lora.dropout must be in [0, 1)"),
        ({"lora.dropout": -0.1}, "lora.dropout must be in [0, 1)"),
        ({"lora.target-modules": " , "}, "lora.target-modules is empty"),
        ({"lora.bias": "some"}, "lora.bias must be one of"),
        ({"lora.init": "loftq"}, "lora.init must be one of"),
        ({"fraction-train": 0.0}, "fraction-train must be in (0, 1]"),
        ({"fraction-train": 1.01}, "fraction-train must be in (0, 1]"),
        ({"num-train-nodes": -1}, "num-train-nodes must be >= 0"),
        ({"sampling": "weighted"}, "sampling must be one of uniform, data-size"),
        ({"sampling": "data-size", "dp-mode": "central"}, "does not hold"),
        ({"fraction-evaluate": -0.01}, "fraction-evaluate must be in [0, 1]"),
        ({"fraction-evaluate": 1.5}, "fraction-evaluate must be in [0, 1]"),
        ({"num-server-rounds": 0}, "num-server-rounds must be > 0"),
        ({"server-optimizer": "sgd"}, "server-optimizer must be one of"),
        ({"server-lr": -0.1}, "server-lr must be >= 0"),
        ({"rolora-first-phase": "c"}, "rolora-first-phase must be one of"),
        ({"data.test-fraction": 0.0}, "data.test-fraction must be in (0, 1)"),
        ({"data.test-fraction": 1.0}, "data.test-fraction must be in (0, 1)"),
        ({"data.partitioner": "random"}, "data.partitioner must be one of"),
        ({"data.source": "imdb"}, "data.source must be one of"),
        ({"data.samples-per-client": -1}, "data.samples-per-client must be >= 0"),
        ({"data.max-length": 0}, "data.max-length must be > 0"),
        ({"model.task": "seq2seq"}, "model.task must be one of"),
        ({"model.dtype": "int8"}, "model.dtype must be one of"),
        ({"model.name": ""}, "model.name is empty"),
        ({"train.lr": 0.0}, "train.lr must be > 0"),
        ({"train.batch-size": 0}, "train.batch-size must be > 0"),
        ({"eval.batch-size": 0}, "eval.batch-size must be > 0"),
        ({"rank-by-partition": "4,x"}, "rank-by-partition must be comma-separated integers"),
        ({"rank-by-partition": "4,65"}, "rank-by-partition has rank 65"),
        ({"rank-by-partition": "0"}, "rank-by-partition has rank 0"),
        ({"rank-by-partition": "4,32", "max-rank": 16}, "rank-by-partition has rank 32"),
        ({"lora.r": 65}, "lora.r 65 exceeds max-rank 64"),
        ({"lora.r": 9, "max-rank": 8}, "lora.r 9 exceeds max-rank 8"),
        ({"model.task": "seq-cls", "data.source": "chatterbot"}, "chatterbot corpus is Q/A"),
        ({"model.task": "causal-lm", "data.source": "bbc-news"}, "bbc-news is labelled"),
    ],
)
def test_invalid_values_are_rejected(flat: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config.from_flat(flat)

    assert fragment in str(excinfo.value)


@pytest.mark.parametrize(
    "flat",
    [
        {"lora.r": 1},
        {"lora.r": 64},  # == max-rank
        {"lora.dropout": 0.0},
        {"lora.dropout": 0.99},
        {"fraction-train": 1.0},
        {"fraction-train": 0.01},
        {"num-train-nodes": 0},
        {"num-train-nodes": 10_000},
        {"sampling": "data-size"},
        {"sampling": "data-size", "dp-mode": "local"},
        {"fraction-evaluate": 0.0},
        {"fraction-evaluate": 1.0},
        {"server-lr": 0.0},
        {"server-optimizer": "fedadam"},
        {"data.test-fraction": 0.01},
        {"data.test-fraction": 0.99},
        {"data.source": "files"},  # deployment: each node's data-path names its file
        {"data.samples-per-client": 0},
        {"rank-by-partition": "4,64"},  # == max-rank
        {"rank-by-partition": " 4 , 8 ,"},
        {"lora.target-modules": "all-linear"},
        {"data.source": "files", "data.path": "x.jsonl"},
        {"model.task": "causal-lm", "data.source": "chatterbot"},
        {"model.task": "causal-lm", "data.source": "files", "data.path": "x.jsonl"},
    ],
)
def test_boundary_values_are_accepted(flat: dict[str, Any]) -> None:
    cfg = config.from_flat(flat)

    produced = config.to_flat(cfg)
    assert all(produced[k] == v for k, v in flat.items())


# ----------------------------------------------------------------------------- derived values


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", ()), ("8", (8,)), ("4,8,16", (4, 8, 16)), (" 4 , 8 ,", (4, 8))],
)
def test_ranks_parses_rank_by_partition(text: str, expected: tuple[int, ...]) -> None:
    assert config.from_flat({"rank-by-partition": text}).fl.ranks() == expected


@pytest.mark.parametrize(
    ("flat", "available", "expected"),
    [
        ({}, 1000, 1000),  # fraction-train 1.0
        ({"fraction-train": 0.01}, 1000, 10),
        ({"fraction-train": 0.001}, 1000, 2),  # min-train-nodes
        ({"num-train-nodes": 10, "fraction-train": 0.5}, 1000, 10),  # a count wins
        ({"num-train-nodes": 1, "min-train-nodes": 1}, 1000, 1),
        ({"num-train-nodes": 1}, 1000, 2),  # still at least min-train-nodes
        ({"num-train-nodes": 50}, 40, 40),  # at most every node
        ({"min-train-nodes": 5}, 3, 3),
    ],
)
def test_clients_per_round(flat: dict[str, Any], available: int, expected: int) -> None:
    assert config.from_flat(flat).fl.clients_per_round(available) == expected


def test_rank_for_partition_cycles() -> None:
    cfg = config.from_flat({"rank-by-partition": "4,8,16"})

    assert [cfg.rank_for_partition(p) for p in range(7)] == [4, 8, 16, 4, 8, 16, 4]


def test_rank_for_partition_defaults_to_lora_r() -> None:
    cfg = config.from_flat({"lora.r": 12})

    assert [cfg.rank_for_partition(p) for p in range(3)] == [12, 12, 12]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("query,value", ["query", "value"]),
        (" q_proj , v_proj ,", ["q_proj", "v_proj"]),
        ("all-linear", "all-linear"),
    ],
)
def test_target_module_list(text: str, expected: list[str] | str) -> None:
    assert config.from_flat({"lora.target-modules": text}).lora.target_module_list == expected


def test_modules_to_save_list() -> None:
    cfg = config.from_flat({"lora.modules-to-save": "score, lm_head"})

    assert cfg.lora.modules_to_save_list == ["score", "lm_head"]
    assert config.from_flat({}).lora.modules_to_save_list == []


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"lora.r": 4, "strategy": "flexlora", "rank-by-partition": "2,4"},
        {"lora.alpha": 32, "lora.use-rslora": True, "train.lr": 1e-4},
        {"model.task": "causal-lm", "data.source": "chatterbot", "model.name": "smollm2",
         "data.partitioner": "natural", "seed": 7},
    ],
)
def test_to_flat_inverts_from_flat(overrides: dict[str, Any]) -> None:
    expected = {**config.defaults(), **overrides}

    assert config.to_flat(config.from_flat(overrides)) == expected


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("lora.r=8", "lora.r", 8),
        ("strategy=flexlora", "strategy", "flexlora"),
        ('rank-by-partition="4,8,16"', "rank-by-partition", "4,8,16"),
        ("rank-by-partition='\"4,8,16\"'", "rank-by-partition", "4,8,16"),
        ("lora.use-rslora=true", "lora.use-rslora", True),
        ("lora.use-rslora=false", "lora.use-rslora", False),
        ("train.lr=1e-3", "train.lr", 1e-3),
        ("lora.alpha=16.0", "lora.alpha", 16.0),
        ("lora.target-modules=q_proj,v_proj", "lora.target-modules", "q_proj,v_proj"),
        ("model.name=org/model", "model.name", "org/model"),
        ("output-dir=", "output-dir", ""),
        ("data.path='my data/train.jsonl'", "data.path", "my data/train.jsonl"),
        ("x=a=b", "x", "a=b"),
    ],
)
def test_parse_overrides_values(text: str, key: str, expected: Any) -> None:
    parsed = config.parse_overrides(text)

    assert parsed == {key: expected}
    assert type(parsed[key]) is type(expected)


def test_parse_overrides_many_items() -> None:
    parsed = config.parse_overrides("lora.r=4 strategy=flora  seed=3")

    assert parsed == {"lora.r": 4, "strategy": "flora", "seed": 3}
    assert config.from_flat(parsed).lora.r == 4


def test_parse_overrides_empty() -> None:
    assert config.parse_overrides("") == {}


@pytest.mark.parametrize("text", ["lora.r", "lora.r=8 seed", "lora.r = 8"])
def test_parse_overrides_rejects_item_without_equals(text: str) -> None:
    with pytest.raises(ConfigError, match="is not key=value"):
        config.parse_overrides(text)
