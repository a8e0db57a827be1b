"""Tests of fedlora.learning.client_round's process caches: bounded, lazily filled, shared where
they may be."""

from __future__ import annotations

from typing import Any

import pytest

from fedlora import config
from fedlora.learning import client_round as client
from fedlora.learning import data

NUM_PARTITIONS = 100


@pytest.fixture(autouse=True)
def _empty_caches():
    for cache in (client._PARTITIONS, client._TRAIN, client._HELDOUT):
        cache.clear()
    yield
    for cache in (client._PARTITIONS, client._TRAIN, client._HELDOUT):
        cache.clear()


def _node(partition_id: int) -> client.Node:
    return client.Node(partition_id, NUM_PARTITIONS, rank=8)


def test_lru_evicts_the_least_recently_used_value():
    # Prepare
    cache: client.Lru[str] = client.Lru(2)
    cache.get("a", lambda: "A")
    cache.get("b", lambda: "B")

    # Execute: touch "a", then a third key pushes one out
    cache.get("a", lambda: "never built")
    cache.get("c", lambda: "C")

    # Assert
    assert len(cache) == 2
    assert cache.get("a", lambda: "rebuilt") == "A"
    assert cache.get("b", lambda: "rebuilt") == "rebuilt"


def test_a_worker_serving_many_clients_reads_the_corpus_once_and_keeps_few(
        monkeypatch, minilm_tokenizer: Any):
    # Prepare: count corpus loads
    loads = []
    load = data.load_corpus
    monkeypatch.setattr(data, "load_corpus", lambda *a, **k: loads.append(1) or load(*a, **k))
    cfg = config.from_flat({})
    served = client.CACHED_CLIENTS + 8

    # Execute: one process serves many virtual clients, as a Ray worker does
    sizes = [len(client.train_examples(cfg, _node(p), minilm_tokenizer)) for p in range(served)]

    # Assert: 1,780 training rows over 100 partitions = 17 or 18 each; the cache stays bounded
    assert len(loads) == 1
    assert set(sizes) <= {17, 18}
    assert len(client._TRAIN) == client.CACHED_CLIENTS
    assert len(client._PARTITIONS) == 1


def test_cached_examples_are_those_of_the_node(minilm_tokenizer: Any):
    cfg = config.from_flat({})
    spec = data.DataSpec(source="bbc-news", task="seq-cls")

    got = client.train_examples(cfg, _node(7), minilm_tokenizer)

    want = data.tokenize(data.client_split(spec, 7, NUM_PARTITIONS)[0], minilm_tokenizer,
                         "seq-cls", cfg.data.max_length)
    assert got == want
    assert client.train_examples(cfg, _node(7), minilm_tokenizer) is got


def test_packaged_heldout_is_tokenized_once_for_all_clients(minilm_tokenizer: Any):
    cfg = config.from_flat({"data.eval-samples": 20})

    first = client.heldout_examples(cfg, _node(0), minilm_tokenizer)
    second = client.heldout_examples(cfg, _node(99), minilm_tokenizer)

    assert second is first and len(first) == 20
    assert len(client._HELDOUT) == 1


def test_own_files_keep_a_heldout_split_per_node(tmp_path, minilm_tokenizer: Any):
    for pid in range(2):
        (tmp_path / f"site-{pid}.jsonl").write_text("".join(
            f'{{"text": "site {pid} note {i}", "label": {i % 2}}}\n' for i in range(10)))
    cfg = config.from_flat({"data.source": "files", "model.num-labels": 2,
                            "data.path": str(tmp_path / "site-{partition-id}.jsonl")})

    held = [client.heldout_examples(cfg, _node(pid), minilm_tokenizer) for pid in range(2)]

    assert held[0] != held[1] and len(held[0]) == len(held[1]) == 2  # 20 % of 10 rows
    assert len(client._HELDOUT) == 2
