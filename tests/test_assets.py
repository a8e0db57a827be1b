"""Tests of fedlora.learning.assets: the packaged models and corpora, and model-name resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.errors import ConfigError
from fedlora.learning import assets

BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def test_minilm_dir_is_a_hf_model_directory() -> None:
    root = assets.minilm_dir()

    assert (root / "config.json").is_file()
    assert (root / "model.safetensors").is_file()
    config = json.loads((root / "config.json").read_text())
    assert config["hidden_size"] == 384
    assert config["num_hidden_layers"] == 6


def test_bbc_news_dir_has_five_topic_dirs() -> None:
    root = assets.bbc_news_dir()

    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert topics == BBC_TOPICS
    assert all(any((root / t).glob("*.txt")) for t in topics)


def test_chatterbot_dir_english_has_yml_files() -> None:
    root = assets.chatterbot_dir("english")

    assert root.is_dir()
    assert root.name == "english"
    assert len(list(root.glob("*.yml"))) >= 10


def test_chatterbot_dir_defaults_to_english() -> None:
    assert assets.chatterbot_dir() == assets.chatterbot_dir("english")


def test_chatterbot_dir_unknown_language() -> None:
    with pytest.raises(ConfigError, match="no language 'klingon'"):
        assets.chatterbot_dir("klingon")


def test_smollm2_gguf_points_at_existing_file() -> None:
    path = assets.smollm2_gguf()

    assert path.suffix == ".gguf"
    assert path.is_file()


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path

    monkeypatch.delenv("FEDLORA_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "fedlora"


# ----------------------------------------------------------------------------- resolve_model


def test_resolve_minilm_alias() -> None:
    resolved = assets.resolve_model("minilm")

    assert Path(resolved).is_dir()
    assert Path(resolved) == assets.minilm_dir()


@pytest.mark.parametrize("name", ["org/model", "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_resolve_hub_id_is_unchanged(name: str) -> None:
    assert assets.resolve_model(name) == name


def test_resolve_existing_model_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)

    assert assets.resolve_model("./m") == str((tmp_path / "m").resolve())
    assert assets.resolve_model(str(tmp_path / "m")) == str((tmp_path / "m").resolve())


@pytest.mark.parametrize(
    "name",
    ["./does-not-exist", "/no/such/model", "~/no-such-model-dir", "a/b/c"],
)
def test_resolve_missing_local_path(name: str) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        assets.resolve_model(name)


def test_resolve_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a model directory"):
        assets.resolve_model(str(tmp_path))


def test_resolve_file_is_not_a_model(tmp_path: Path) -> None:
    file = tmp_path / "config.json"
    file.write_text("{}")

    with pytest.raises(ConfigError, match="not a model directory"):
        assets.resolve_model(str(file))
