"""Fixtures shared by the module tests: offline hub settings, tiny models, tokenizers."""

from __future__ import annotations

import os

# Nothing in the tests may reach the network; set before transformers/datasets are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedlora.learning import (
    assets,  # noqa: E402
    lora,
)

EOS = "[SEP]"  # the MiniLM (BERT) vocabulary has no EOS token; [SEP] plays that role


@pytest.fixture(autouse=True)
def _fast_tests_start_no_federation(request, monkeypatch):
    """A test not marked ``slow`` may not start a SuperLink or SuperNode, in this process or in
    a child (``fedlora.runtime.launcher.console_script`` refuses under ``FEDLORA_FAST_TEST``): so
    ``make test-fast`` really skips every real simulation and deployment."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("FEDLORA_FAST_TEST", request.node.nodeid)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def minilm_spec() -> lora.ModelSpec:
    """The packaged MiniLM truncated to one layer, 5-way classification."""
    return lora.ModelSpec(path=str(assets.minilm_dir()), task="seq-cls", num_labels=5,
                          num_hidden_layers=1)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.minilm_dir())


@pytest.fixture(scope="session")
def causal_tokenizer():
    """MiniLM's tokenizer with an EOS token, as a causal-LM tokenizer (no chat template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.minilm_dir())
    tok.eos_token = EOS
    return tok


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random one-layer Llama (hidden 32) with MiniLM's tokenizer, saved like a hub model.

    The tokenizer has an EOS token but no pad token, so :func:`fedlora.learning.lora.load_base` must
    fall back to EOS for padding.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(assets.minilm_dir())
    tok.eos_token = EOS
    tok.pad_token = None
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
        bos_token_id=tok.cls_token_id, pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_causal_spec(tiny_causal_dir: Path) -> lora.ModelSpec:
    return lora.ModelSpec(path=str(tiny_causal_dir), task="causal-lm")
