"""Tests of fedlora.learning.data: corpora, held-out split, partitioning, own files, tokenize,
collate."""

from __future__ import annotations

import collections
import functools
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from fedlora.errors import DataError
from fedlora.learning import data

BBC_LABELS = ["business", "entertainment", "politics", "sports", "tech"]
BBC_SIZE = 2225
NUM_PARTITIONS = 3


@pytest.fixture(scope="module", autouse=True)
def _cached_corpora() -> Any:
    """Read each packaged corpus once per module (the loaders are pure; datasets immutable)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "_bbc_news", functools.cache(data._bbc_news))
        mp.setattr(data, "_chatterbot", functools.cache(data._chatterbot))
        yield
    _split.cache_clear()


@functools.cache
def _split(partition_id: int, num_partitions: int = NUM_PARTITIONS, **spec: Any
           ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """client_split of the packaged corpora, cached (each call re-reads the corpus)."""
    spec.setdefault("source", "bbc-news")
    spec.setdefault("task", "seq-cls")
    return data.client_split(data.DataSpec(**spec), partition_id, num_partitions)


def _label_share(ds: datasets.Dataset, num_labels: int = 5) -> list[float]:
    counts = collections.Counter(ds["label"])
    return [counts[k] / len(ds) for k in range(num_labels)]


def _total_variation(p: list[float], q: list[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))


# ----------------------------------------------------------------------------- packaged corpora


def test_bbc_corpus_has_2225_rows_and_5_labels() -> None:
    ds = data.load_corpus(data.DataSpec(source="bbc-news", task="seq-cls"))

    assert len(ds) == BBC_SIZE
    assert ds.features["label"].names == BBC_LABELS
    assert set(ds["label"]) == set(range(5))
    # topic column names the label of each row
    assert all(BBC_LABELS[label] == topic for label, topic in zip(ds["label"], ds["topic"],
                                                                   strict=True))
    assert all(text for text in ds["text"])


def test_label_names() -> None:
    assert data.label_names(data.DataSpec(source="bbc-news", task="seq-cls")) == BBC_LABELS
    assert data.label_names(data.DataSpec(source="chatterbot", task="causal-lm")) is None
    assert data.label_names(data.DataSpec(source="files", task="seq-cls", path="x")) is None


def test_chatterbot_corpus_pairs_prompts_with_answers() -> None:
    ds = data.load_corpus(data.DataSpec(source="chatterbot", task="causal-lm"))

    assert set(ds.column_names) == {"instruction", "response", "topic"}
    assert len(ds) > 1000
    assert len(set(ds["topic"])) > 10
    assert all(q and a for q, a in zip(ds["instruction"], ds["response"], strict=True))


# ----------------------------------------------------------------------------- iid split


def test_iid_partition_sizes_are_capped() -> None:
    for p in range(NUM_PARTITIONS):
        train, _ = _split(p, samples_per_client=160)
        assert len(train) == 160


def test_iid_partitions_and_heldout_partition_the_corpus() -> None:
    # Prepare: BBC has duplicate articles, so compare multisets of texts rather than sets
    corpus = collections.Counter(
        data.load_corpus(data.DataSpec(source="bbc-news", task="seq-cls"))["text"])
    parts = [_split(p, samples_per_client=0, eval_samples=0) for p in range(NUM_PARTITIONS)]
    test = parts[0][1]

    # Assert: training partitions + held-out split = the corpus, each row exactly once
    total = collections.Counter(test["text"])
    for train, _ in parts:
        total += collections.Counter(train["text"])
    assert total == corpus
    assert sum(len(train) for train, _ in parts) + len(test) == BBC_SIZE
    assert len(test) == 445  # test_fraction 0.2 of 2225
    sizes = sorted(len(train) for train, _ in parts)
    assert sizes[-1] - sizes[0] <= 1  # iid: equal shares


def test_iid_capped_partitions_are_disjoint() -> None:
    corpus = collections.Counter(
        data.load_corpus(data.DataSpec(source="bbc-news", task="seq-cls"))["text"])
    parts = [_split(p, samples_per_client=160) for p in range(NUM_PARTITIONS)]

    total = collections.Counter(parts[0][1]["text"])
    for train, _ in parts:
        total += collections.Counter(train["text"])
    # no row counted more often than it occurs in the corpus
    assert all(total[text] <= corpus[text] for text in total)
    # and distinct articles dominate: overlap by duplicate texts only
    texts = [set(train["text"]) for train, _ in parts]
    for i in range(NUM_PARTITIONS):
        for j in range(i + 1, NUM_PARTITIONS):
            assert all(corpus[t] > 1 for t in texts[i] & texts[j])


def test_heldout_is_identical_for_all_clients_and_the_server() -> None:
    spec = data.DataSpec(source="bbc-news", task="seq-cls", samples_per_client=160)
    tests = [_split(p, samples_per_client=160)[1] for p in range(NUM_PARTITIONS)]
    server = data.heldout(spec)

    assert len(tests[0]) == 445  # below the 500 eval cap
    for test in tests[1:]:
        assert list(test["text"]) == list(tests[0]["text"])
        assert list(test["label"]) == list(tests[0]["label"])
    assert server is not None
    assert list(server["text"]) == list(tests[0]["text"])


@pytest.mark.parametrize(("eval_samples", "expected"), [(0, 445), (1, 1), (100, 100),
                                                        (445, 445), (446, 445)])
def test_heldout_is_capped_at_eval_samples(eval_samples: int, expected: int) -> None:
    _, test = _split(0, samples_per_client=160, eval_samples=eval_samples)

    assert len(test) == expected


def test_split_is_deterministic() -> None:
    spec = data.DataSpec(source="bbc-news", task="seq-cls", samples_per_client=50)

    first_train, first_test = data.client_split(spec, 1, NUM_PARTITIONS)
    second_train, second_test = data.client_split(spec, 1, NUM_PARTITIONS)

    assert list(first_train["text"]) == list(second_train["text"])
    assert list(first_test["text"]) == list(second_test["text"])


def test_split_depends_on_seed() -> None:
    train_0, test_0 = _split(0, samples_per_client=50, seed=0)
    train_1, test_1 = _split(0, samples_per_client=50, seed=1)

    assert list(train_0["text"]) != list(train_1["text"])
    assert set(test_0["text"]) != set(test_1["text"])


@pytest.mark.parametrize("partition_id", [-1, NUM_PARTITIONS])
def test_partition_id_out_of_range(partition_id: int) -> None:
    spec = data.DataSpec(source="bbc-news", task="seq-cls")

    with pytest.raises(DataError, match=f"partition-id {partition_id} is outside 0..2"):
        data.client_split(spec, partition_id, NUM_PARTITIONS)


def test_partitions_give_what_client_split_gives() -> None:
    spec = data.DataSpec(source="bbc-news", task="seq-cls", samples_per_client=40)

    parts = data.Partitions(spec, NUM_PARTITIONS)

    for p in range(NUM_PARTITIONS):
        train, test = data.client_split(spec, p, NUM_PARTITIONS)
        assert list(parts.train(p)["text"]) == list(train["text"])
        assert list(parts.heldout["text"]) == list(test["text"])


def test_partitions_select_a_clients_rows_only_when_asked(monkeypatch) -> None:
    # Prepare: count the partitions the flwr_datasets partitioner is asked to build
    asked: list[int] = []
    make = data._partitioner

    def counting(*args: Any, **kwargs: Any) -> Any:
        partitioner = make(*args, **kwargs)
        load = partitioner.load_partition
        partitioner.load_partition = lambda pid: asked.append(pid) or load(pid)
        return partitioner

    monkeypatch.setattr(data, "_partitioner", counting)
    spec = data.DataSpec(source="bbc-news", task="seq-cls")

    # Execute
    parts = data.Partitions(spec, 1000)
    built_eagerly = list(asked)
    rows = parts.train(999)

    # Assert: nothing built up front; then only the one partition (1,780 rows / 1,000 = 1 or 2)
    assert built_eagerly == []
    assert asked == [999] and 1 <= len(rows) <= 2


@pytest.mark.parametrize("partition_id", [-1, 1000])
def test_partitions_refuse_an_unknown_partition(partition_id: int) -> None:
    parts = data.Partitions(data.DataSpec(source="bbc-news", task="seq-cls"), 1000)

    with pytest.raises(DataError, match=f"partition-id {partition_id} is outside 0..999"):
        parts.train(partition_id)


# ----------------------------------------------------------------------------- label skew


def test_iid_partitions_follow_the_global_label_distribution() -> None:
    overall = _label_share(data.load_corpus(data.DataSpec(source="bbc-news", task="seq-cls")))

    for p in range(NUM_PARTITIONS):
        train, _ = _split(p, samples_per_client=0)
        assert _total_variation(_label_share(train), overall) < 0.05


def test_dirichlet_partitions_are_label_skewed() -> None:
    overall = _label_share(data.load_corpus(data.DataSpec(source="bbc-news", task="seq-cls")))

    for p in range(NUM_PARTITIONS):
        train, _ = _split(p, samples_per_client=0, partitioner="dirichlet", dirichlet_alpha=0.1)
        assert len(train) > 0
        assert _total_variation(_label_share(train), overall) > 0.3


def test_pathological_partitions_hold_at_most_k_labels() -> None:
    classes = 2
    for p in range(NUM_PARTITIONS):
        train, _ = _split(p, samples_per_client=0, partitioner="pathological",
                          classes_per_partition=classes)
        assert len(train) > 0
        assert 1 <= len(set(train["label"])) <= classes


# ----------------------------------------------------------------------------- natural split


def test_natural_split_puts_each_topic_in_exactly_one_partition() -> None:
    # Prepare
    spec = dict(source="chatterbot", task="causal-lm", partitioner="natural",
                samples_per_client=0)
    parts = [_split(p, **spec)[0] for p in range(NUM_PARTITIONS)]
    corpus_train, _ = data.train_test_split(
        data.load_corpus(data.DataSpec(source="chatterbot", task="causal-lm")),
        data.DataSpec(source="chatterbot", task="causal-lm"))
    topics = sorted(set(corpus_train["topic"]))

    # Assert: topic i (sorted) lives on client i mod N, and nowhere else
    owners: dict[str, list[int]] = collections.defaultdict(list)
    for p, train in enumerate(parts):
        for topic in set(train["topic"]):
            owners[topic].append(p)
    assert sorted(owners) == topics
    assert {t: ps for t, ps in owners.items()} == {
        t: [i % NUM_PARTITIONS] for i, t in enumerate(topics)}
    assert sum(len(train) for train in parts) == len(corpus_train)


def test_natural_split_for_labels_on_bbc() -> None:
    for p in range(NUM_PARTITIONS):
        train, _ = _split(p, samples_per_client=0, partitioner="natural")
        # labels 0..4 to clients 0,1,2,0,1
        assert set(train["label"]) == {k for k in range(5) if k % NUM_PARTITIONS == p}


@pytest.mark.parametrize(("num_partitions", "ok"), [(5, True), (6, False)])
def test_natural_split_needs_a_topic_per_client(num_partitions: int, ok: bool) -> None:
    spec = data.DataSpec(source="bbc-news", task="seq-cls", partitioner="natural")

    if ok:
        train, _ = data.client_split(spec, num_partitions - 1, num_partitions)
        assert set(train["label"]) == {4}
    else:
        with pytest.raises(DataError, match="5 topics for 6 clients"):
            data.client_split(spec, 0, num_partitions)


# ----------------------------------------------------------------------------- own files


ROWS = [{"text": f"document number {i}", "label": i % 3} for i in range(10)]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_load_own_file(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path / f"train{suffix}", ROWS)

    ds = data.load_files(str(path), "seq-cls")

    assert list(ds["text"]) == [r["text"] for r in ROWS]
    assert list(ds["label"]) == [r["label"] for r in ROWS]


def test_load_own_file_with_string_labels(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
            {"text": "c", "label": "pos"}]
    path = _write(tmp_path / "train.jsonl", rows)

    ds = data.load_files(str(path), "seq-cls")

    assert ds.features["label"].names == ["neg", "pos"]  # sorted names → 0, 1
    assert list(ds["label"]) == [1, 0, 1]


def test_load_own_instruction_file(tmp_path: Path) -> None:
    rows = [{"instruction": "hi", "response": "hello"}, {"instruction": "bye", "response": "ciao"}]
    path = _write(tmp_path / "chat.jsonl", rows)

    ds = data.load_files(str(path), "causal-lm")

    assert list(ds["instruction"]) == ["hi", "bye"]
    assert list(ds["response"]) == ["hello", "ciao"]


def test_load_directory_of_files(tmp_path: Path) -> None:
    _write(tmp_path / "a.jsonl", ROWS[:4])
    _write(tmp_path / "b.jsonl", ROWS[4:])
    (tmp_path / "README.md").write_text("ignored")

    ds = data.load_files(str(tmp_path), "seq-cls")

    assert sorted(ds["text"]) == sorted(r["text"] for r in ROWS)


def test_directory_of_mixed_formats(tmp_path: Path) -> None:
    _write(tmp_path / "a.jsonl", ROWS[:4])
    _write(tmp_path / "b.csv", ROWS[4:])

    with pytest.raises(DataError, match="must share one format"):
        data.load_files(str(tmp_path), "seq-cls")


def test_directory_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")

    with pytest.raises(DataError, match="holds no .jsonl/.json/.csv/.parquet file"):
        data.load_files(str(tmp_path), "seq-cls")


def test_unsupported_file_suffix(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("text\n")

    with pytest.raises(DataError, match=r"\['train.txt'\]"):
        data.load_files(str(path), "seq-cls")


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"

    with pytest.raises(DataError) as excinfo:
        data.load_files(str(missing), "seq-cls")

    assert str(missing) in str(excinfo.value)
    assert "does not exist" in str(excinfo.value)
    assert "data.path" in str(excinfo.value)


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all")

    with pytest.raises(DataError) as excinfo:
        data.load_files(str(path), "seq-cls")

    assert "cannot read" in str(excinfo.value)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.jsonl", ""), ("header-only.csv", "text,label\n")],
)
def test_file_with_no_rows(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)

    with pytest.raises(DataError) as excinfo:
        data.load_files(str(path), "seq-cls")

    assert "no rows" in str(excinfo.value)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    ("task", "rows", "missing"),
    [
        ("seq-cls", [{"body": "x", "label": 1}], "['text']"),
        ("seq-cls", [{"body": "x", "y": 1}], "['text', 'label']"),
        ("causal-lm", [{"text": "x", "label": 1}], "['instruction', 'response']"),
        ("causal-lm", [{"instruction": "x", "answer": "y"}], "['response']"),
    ],
)
def test_wrong_columns(tmp_path: Path, task: str, rows: list[dict[str, Any]],
                       missing: str) -> None:
    path = _write(tmp_path / "train.jsonl", rows)

    with pytest.raises(DataError) as excinfo:
        data.load_files(str(path), task)

    message = str(excinfo.value)
    assert f"lacks column(s) {missing}" in message
    assert f"it has {list(rows[0])}" in message
    assert "Rename columns" in message


def test_partition_id_is_substituted_in_path(tmp_path: Path) -> None:
    # Prepare: one file per node, different texts
    for p in range(2):
        _write(tmp_path / f"node-{p}.jsonl",
               [{"text": f"node {p} row {i}", "label": i % 2} for i in range(10)])
    spec = data.DataSpec(source="files", task="seq-cls",
                         path=str(tmp_path / "node-{partition-id}.jsonl"), test_fraction=0.2)

    # Execute
    train, test = data.client_split(spec, 1, 2)

    # Assert: node 1's rows only, split 8 / 2, disjoint
    assert len(train) == 8 and len(test) == 2
    texts = list(train["text"]) + list(test["text"])
    assert sorted(texts) == sorted(f"node 1 row {i}" for i in range(10))


def test_data_path_argument_overrides_spec_path(tmp_path: Path) -> None:
    own = _write(tmp_path / "own.csv", ROWS)
    spec = data.DataSpec(source="bbc-news", task="seq-cls", samples_per_client=3,
                         eval_samples=1)

    train, test = data.client_split(spec, 0, 2, data_path=str(own))

    assert len(train) == 3 and len(test) == 1
    assert set(list(train["text"]) + list(test["text"])) <= {r["text"] for r in ROWS}


def test_single_row_file_is_both_train_and_heldout(tmp_path: Path) -> None:
    path = _write(tmp_path / "one.jsonl", ROWS[:1])
    spec = data.DataSpec(source="files", task="seq-cls", path=str(path))

    train, test = data.client_split(spec, 0, 1)

    assert list(train["text"]) == list(test["text"]) == [ROWS[0]["text"]]


def test_server_heldout_of_per_node_files_is_none(tmp_path: Path) -> None:
    spec = data.DataSpec(source="files", task="seq-cls",
                         path=str(tmp_path / "node-{partition-id}.jsonl"))

    assert data.heldout(spec) is None


# ----------------------------------------------------------------------------- tokenize


def test_tokenize_seq_cls(minilm_tokenizer: Any) -> None:
    ds = datasets.Dataset.from_dict({"text": ["hello world", "a b c d e f g h i j k"],
                                     "label": [3, 0]})

    examples = data.tokenize(ds, minilm_tokenizer, "seq-cls", max_length=6)

    cls, sep = minilm_tokenizer.cls_token_id, minilm_tokenizer.sep_token_id
    assert examples[0] == {"input_ids": [cls, *minilm_tokenizer.convert_tokens_to_ids(
        ["hello", "world"]), sep], "labels": 3}
    # truncated to max_length and still closed with [SEP]
    assert examples[1]["input_ids"] == [cls, *minilm_tokenizer.convert_tokens_to_ids(
        ["a", "b", "c", "d"]), sep]
    assert examples[1]["labels"] == 0
    assert all(isinstance(ex["labels"], int) for ex in examples)


def _prompt_len(tokenizer: Any, instruction: str) -> int:
    prompt = f"### Instruction:\n{instruction}\n\n### Response:\n"
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_tokenize_causal_masks_prompt(causal_tokenizer: Any) -> None:
    ds = datasets.Dataset.from_dict({"instruction": ["What is AI?"],
                                     "response": ["A field of study."]})

    (example,) = data.tokenize(ds, causal_tokenizer, "causal-lm", max_length=64)

    ids, labels = example["input_ids"], example["labels"]
    k = _prompt_len(causal_tokenizer, "What is AI?")
    answer = causal_tokenizer.convert_tokens_to_ids(["a", "field", "of", "study", "."])
    eos = causal_tokenizer.eos_token_id
    assert len(ids) == len(labels) == k + len(answer) + 1
    assert labels[:k] == [data.IGNORE_INDEX] * k
    assert labels[k:] == ids[k:] == [*answer, eos]
    assert "what is ai?" in causal_tokenizer.decode(ids[:k])


@pytest.mark.parametrize("extra", [1, 3])
def test_tokenize_causal_truncates(causal_tokenizer: Any, extra: int) -> None:
    ds = datasets.Dataset.from_dict({"instruction": ["What is AI?"],
                                     "response": ["A field of study."]})
    k = _prompt_len(causal_tokenizer, "What is AI?")

    (example,) = data.tokenize(ds, causal_tokenizer, "causal-lm", max_length=k + extra)

    answer = causal_tokenizer.convert_tokens_to_ids(["a", "field", "of", "study", "."])
    assert len(example["input_ids"]) == len(example["labels"]) == k + extra
    assert example["labels"][k:] == answer[:extra]


def test_tokenize_causal_drops_examples_without_answer_tokens(causal_tokenizer: Any) -> None:
    ds = datasets.Dataset.from_dict({"instruction": ["What is AI?", "Hi"],
                                     "response": ["A field of study.", "Hello"]})
    k = _prompt_len(causal_tokenizer, "What is AI?")
    assert _prompt_len(causal_tokenizer, "Hi") < k

    examples = data.tokenize(ds, causal_tokenizer, "causal-lm", max_length=k)

    # the first prompt fills max_length entirely: no label left, example dropped
    assert len(examples) == 1
    assert examples[0]["input_ids"][:3] == causal_tokenizer.convert_tokens_to_ids(["#"] * 3)
    assert any(label != data.IGNORE_INDEX for label in examples[0]["labels"])


# ----------------------------------------------------------------------------- collate


def test_collate_classification_pads_right() -> None:
    batch = [{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 4}]

    out = data.collate(batch, pad_token_id=99)

    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [1, 4]
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_causal_pads_labels_with_ignore_index() -> None:
    batch = [{"input_ids": [5, 6], "labels": [-100, 6]},
             {"input_ids": [8, 9, 10, 11], "labels": [-100, -100, 10, 11]}]

    out = data.collate(batch, pad_token_id=0)

    assert out["input_ids"].tolist() == [[5, 6, 0, 0], [8, 9, 10, 11]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, 6, -100, -100], [-100, -100, 10, 11]]
    assert out["labels"].dtype == torch.long


def test_collate_equal_lengths_adds_no_padding() -> None:
    out = data.collate([{"input_ids": [1, 2], "labels": 0}, {"input_ids": [3, 4], "labels": 1}],
                       pad_token_id=7)

    assert out["input_ids"].tolist() == [[1, 2], [3, 4]]
    assert out["attention_mask"].tolist() == [[1, 1], [1, 1]]
