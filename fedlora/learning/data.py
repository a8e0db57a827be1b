"""Client data: load a corpus, keep a held-out split, partition, tokenize, collate.

Every client reads only its own partition. The packaged corpora are split the same way on every
process (seeded), so a client computes its partition locally and nothing but adapter factors
ever leaves it. A user's own files are read per node (``data-path`` in the node config or
``data.path`` with ``{partition-id}``), and their held-out split stays on that node.

Columns: classification corpora have ``text`` and ``label`` (int); instruction corpora have
``instruction`` and ``response``; both may carry ``topic`` for natural (by-topic) splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from fedlora.errors import DataError
from fedlora.learning import assets

if TYPE_CHECKING:  # torch is imported by collate only: checking files before a run needs none
    import torch

datasets.disable_progress_bars()

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE_INDEX = -100


@dataclass(frozen=True)
class DataSpec:
    """Plain arguments of the data pipeline (built from ``DataConfig`` by the apps)."""

    source: str
    task: str
    path: str = ""
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    samples_per_client: int = 160
    eval_samples: int = 500
    test_fraction: float = 0.2
    seed: int = 0
    heldout_path: str = ""
    num_labels: int = 0


# ----------------------------------------------------------------------------- loading


def _bbc_news() -> datasets.Dataset:
    root = assets.bbc_news_dir()
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows: dict[str, list[Any]] = {"text": [], "label": [], "topic": []}
    for idx, name in enumerate(labels):
        for file in sorted((root / name).glob("*.txt")):
            rows["text"].append(file.read_text(encoding="utf-8", errors="replace").strip())
            rows["label"].append(idx)
            rows["topic"].append(name)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=labels),
         "topic": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(rows, features=features)


def _chatterbot() -> datasets.Dataset:
    import yaml

    rows: dict[str, list[str]] = {"instruction": [], "response": [], "topic": []}
    for file in sorted(assets.chatterbot_dir().glob("*.yml")):
        doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            # A conversation lists a prompt then alternative answers: pair the prompt with each.
            for answer in turns[1:]:
                rows["instruction"].append(turns[0])
                rows["response"].append(answer)
                rows["topic"].append(file.stem)
    return datasets.Dataset.from_dict(rows)


PARTITION_TEMPLATE = "{partition-id}"
NO_DATA_PATH = ("data.source = 'files' needs a file: set data.path (e.g. "
                "data.path=/data/site-{partition-id}.jsonl) or, on a SuperNode, the node config "
                "data-path (--node-config 'data-path=\"/data/site-0.jsonl\"'); neither is set")


def _resolve_files(path: str, partition_id: int | None, key: str = "data.path / data-path"
                   ) -> list[Path]:
    text = (path.replace(PARTITION_TEMPLATE, str(partition_id)) if partition_id is not None
            else path)
    p = Path(text).expanduser()
    if not p.exists():
        near = _near_names(p)
        raise DataError(f"data file {str(p)!r} (from {key}) does not exist"
                        + (f"; files next to it: {near}" if near else "")
                        + f"; fix the path in {key}")
    files = sorted(f for f in p.iterdir() if f.suffix in FILE_FORMATS) if p.is_dir() else [p]
    if not files:
        raise DataError(f"directory {str(p)!r} holds no {'/'.join(FILE_FORMATS)} file")
    bad = [f.name for f in files if f.suffix not in FILE_FORMATS]
    if bad or len({FILE_FORMATS[f.suffix] for f in files}) > 1:
        raise DataError(
            f"data files must share one format among {', '.join(FILE_FORMATS)}; got {bad or files}"
        )
    return files


def _near_names(p: Path) -> list[str]:
    """Up to five data files in the missing file's directory (to spot a typo)."""
    try:
        return sorted(f.name for f in p.parent.iterdir() if f.suffix in FILE_FORMATS)[:5]
    except OSError:
        return []


def _holds_no_rows(file: Path) -> bool:
    """True for an empty file, a CSV with only a header, or a parquet file of zero rows."""
    if file.stat().st_size == 0:
        return True
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(file).num_rows == 0
        except Exception:  # not parquet at all: unreadable, not empty
            return False
    lines = [line for line in file.read_text(errors="replace").splitlines() if line.strip()]
    return len(lines) <= (1 if file.suffix == ".csv" else 0)


def load_files(path: str, task: str, partition_id: int | None = None, num_labels: int = 0,
               key: str = "data.path / data-path") -> datasets.Dataset:
    """Load a user's own jsonl/json/csv/parquet file(s) and check them for ``task``.

    Checks the columns, that there are rows and, for classification with ``num_labels`` > 0,
    that every label is in ``0..num_labels-1`` (integer labels) or that there are at most
    ``num_labels`` label names. ``key`` names the config key the path came from in errors.
    """
    files = _resolve_files(path, partition_id, key)
    try:
        ds = datasets.load_dataset(
            FILE_FORMATS[files[0].suffix], data_files=[str(f) for f in files], split="train"
        )
    except Exception as exc:  # datasets raises many types for unreadable input
        if all(_holds_no_rows(f) for f in files):
            raise DataError(f"data file(s) {[str(f) for f in files]} hold no rows") from exc
        raise DataError(f"cannot read data file(s) {[str(f) for f in files]}: "
                        f"{type(exc).__name__}: {exc}") from exc
    need = ("text", "label") if task == "seq-cls" else ("instruction", "response")
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{files[0].name} lacks column(s) {missing} for task {task!r}; it has "
            f"{ds.column_names}. Rename columns to {list(need)}"
        )
    if len(ds) == 0:
        raise DataError(f"data file(s) {[str(f) for f in files]} hold no rows")
    if task == "seq-cls" and not isinstance(ds.features["label"], datasets.ClassLabel):
        if ds.features["label"].dtype.startswith("int"):
            _check_label_range(ds, files, num_labels)
            return ds
        if not ds.features["label"].dtype.startswith("string") and \
                ds.features["label"].dtype != "large_string":
            raise DataError(
                f"{files[0]}: column 'label' holds {ds.features['label'].dtype} values; labels "
                f"must be integers 0..num-labels-1 or class names (strings)")
        ds = ds.class_encode_column("label")
        names = ds.features["label"].names
        if num_labels and len(names) > num_labels:
            raise DataError(
                f"{_names(files)}: {len(names)} label names {names} but model.num-labels = "
                f"{num_labels}; set model.num-labels = {len(names)} or merge the extra classes")
    return ds


def _names(files: Sequence[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{[str(f) for f in files]}"


def _check_label_range(ds: datasets.Dataset, files: Sequence[Path], num_labels: int) -> None:
    """Integer labels must lie in ``0..num_labels-1`` (what the classifier head outputs)."""
    if not num_labels:
        return
    values = sorted(set(ds["label"]))
    bad = [v for v in values if not 0 <= v < num_labels]
    if not bad:
        return
    shown = bad[:10] + (["..."] if len(bad) > 10 else [])
    fix = (f"renumber the labels to start at 0 (e.g. subtract {values[0]}: "
           f"{values[0]}..{values[-1]} -> 0..{values[-1] - values[0]})"
           if values[0] > 0 and values[-1] - values[0] < num_labels
           else f"set model.num-labels = {values[-1] + 1}" if values[0] >= 0
           else "use labels 0..num-labels-1")
    raise DataError(
        f"{_names(files)}: label value(s) {shown} are outside 0..{num_labels - 1} "
        f"(model.num-labels = {num_labels}; the file has labels {values[0]}..{values[-1]}); "
        f"{fix}")


def load_corpus(spec: DataSpec, partition_id: int | None = None) -> datasets.Dataset:
    """The whole corpus of ``spec.source`` (a node's own files for ``files``)."""
    if spec.source == "bbc-news":
        return _bbc_news()
    if spec.source == "chatterbot":
        return _chatterbot()
    return load_files(spec.path, spec.task, partition_id, spec.num_labels, "data.path")


# ----------------------------------------------------------------------------- splitting


def train_test_split(ds: datasets.Dataset, spec: DataSpec) -> tuple[datasets.Dataset,
                                                                        datasets.Dataset]:
    """Seeded held-out split; the same on every process."""
    split = ds.train_test_split(test_size=spec.test_fraction, seed=spec.seed, shuffle=True)
    return split["train"], split["test"]


def _partitioner(spec: DataSpec, num_partitions: int, ds: datasets.Dataset) -> Any:
    from flwr_datasets import partitioner as fp

    key = "label" if spec.task == "seq-cls" else "topic"
    if spec.partitioner == "iid":
        return fp.IidPartitioner(num_partitions)
    if key not in ds.column_names:
        raise DataError(
            f"data.partitioner {spec.partitioner!r} needs a {key!r} column; the data has "
            f"{ds.column_names}. Use data.partitioner = 'iid'"
        )
    if spec.partitioner == "dirichlet":
        return fp.DirichletPartitioner(
            num_partitions, partition_by=key, alpha=spec.dirichlet_alpha,
            min_partition_size=1, self_balancing=False, seed=spec.seed,
        )
    if spec.partitioner == "pathological":
        return fp.PathologicalPartitioner(
            num_partitions, partition_by=key,
            num_classes_per_partition=spec.classes_per_partition, seed=spec.seed,
        )
    return fp.NaturalIdPartitioner(partition_by="group")


def _with_groups(ds: datasets.Dataset, num_partitions: int, task: str) -> datasets.Dataset:
    """Natural split: topic i goes to client i mod N (sorted so group ids map to partitions)."""
    key = "label" if task == "seq-cls" else "topic"
    topics = sorted(set(ds[key]))
    if len(topics) < num_partitions:
        raise DataError(
            f"natural split has {len(topics)} topics for {num_partitions} clients; use at most "
            f"{len(topics)} clients or another data.partitioner"
        )
    index = {t: i % num_partitions for i, t in enumerate(topics)}
    ds = ds.map(lambda row: {"group": index[row[key]]})
    return ds.sort("group")


class Partitions:
    """A packaged corpus split once into ``num_partitions`` client partitions, lazily.

    Building one reads the corpus, keeps the seeded held-out split and prepares the
    ``flwr_datasets`` partitioner; a client's rows are selected only when :meth:`train` asks
    for them (an index view into the one corpus table, not a copy). A process serving 1,000
    virtual clients therefore holds the corpus once plus the partitions it was asked for.
    Partitioners that need a global assignment (Dirichlet, pathological) compute it once on
    the first request: row indices for every partition, never their rows.
    """

    def __init__(self, spec: DataSpec, num_partitions: int) -> None:
        if num_partitions < 1:
            raise DataError(f"num-partitions must be >= 1; got {num_partitions}")
        self.spec = spec
        self.num_partitions = num_partitions
        train, test = train_test_split(load_corpus(spec), spec)
        train = train.shuffle(seed=spec.seed)
        if spec.partitioner == "natural":
            train = _with_groups(train, num_partitions, spec.task)
        self._partitioner = _partitioner(spec, num_partitions, train)
        self._partitioner.dataset = train
        self.heldout = _cap(test, spec.eval_samples)

    def train(self, partition_id: int) -> datasets.Dataset:
        """Training rows of one client, capped at ``samples_per_client``."""
        if not 0 <= partition_id < self.num_partitions:
            raise DataError(f"partition-id {partition_id} is outside "
                            f"0..{self.num_partitions - 1}")
        mine = self._partitioner.load_partition(partition_id)
        if len(mine) == 0:
            raise DataError(
                f"partition {partition_id} of {self.num_partitions} ({self.spec.partitioner}) "
                f"has no rows; use fewer clients, a larger data.dirichlet-alpha, or "
                f"data.partitioner = 'iid'"
            )
        return _cap(mine, self.spec.samples_per_client)


def client_split(spec: DataSpec, partition_id: int, num_partitions: int,
                 data_path: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held-out) examples of one client.

    For the packaged corpora the training part of the global split is partitioned with a
    ``flwr_datasets`` partitioner and capped at ``samples_per_client``; the held-out part is the
    server's. For a user's own files, the node's file is split into its train/held-out parts.
    Callers that serve many clients keep one :class:`Partitions` instead of calling this per
    client (each call reads the corpus).
    """
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    if spec.source == "files" or data_path:
        return own_split(spec, partition_id, data_path)
    parts = Partitions(spec, num_partitions)
    return parts.train(partition_id), parts.heldout


def own_split(spec: DataSpec, partition_id: int, data_path: str | None = None
              ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held-out) rows of a node's own file(s): ``data_path`` or ``spec.path``."""
    if not (data_path or spec.path):
        raise DataError(NO_DATA_PATH)
    local = load_files(data_path or spec.path, spec.task, partition_id, spec.num_labels,
                       "data-path (node config)" if data_path else "data.path")
    train, test = (train_test_split(local, spec) if len(local) > 1 else (local, local))
    return _cap(train, spec.samples_per_client), _cap(test, spec.eval_samples)


def heldout(spec: DataSpec) -> datasets.Dataset | None:
    """The server's held-out data for central evaluation, or ``None`` when it has none.

    * ``heldout_path`` set: that file (or directory), **whole** — neither ``test_fraction`` nor
      ``eval_samples`` cuts it; a missing or unreadable file is a :class:`DataError`.
    * a packaged corpus: its seeded held-out split, capped at ``eval_samples``.
    * ``files`` with a ``{partition-id}`` template: ``None`` (the files are the clients').
    * ``files`` with one path: its held-out split where the server can read it, else ``None``
      (in deployment the file usually lives on the nodes only).
    """
    if spec.heldout_path:
        return load_files(spec.heldout_path, spec.task, None, spec.num_labels,
                          "data.heldout-path")
    if spec.source == "files":
        if PARTITION_TEMPLATE in spec.path or not spec.path:
            return None
        try:
            corpus = load_files(spec.path, spec.task, None, spec.num_labels, "data.path")
        except DataError:
            return None
    else:
        corpus = load_corpus(spec)
    return _cap(train_test_split(corpus, spec)[1], spec.eval_samples)


def _cap(ds: datasets.Dataset, n: int) -> datasets.Dataset:
    return ds.select(range(min(n, len(ds)))) if n else ds


def label_names(spec: DataSpec) -> list[str] | None:
    """Class names for classification corpora that define them."""
    if spec.task != "seq-cls":
        return None
    if spec.source == "bbc-news":
        return sorted(p.name for p in assets.bbc_news_dir().iterdir() if p.is_dir())
    return None


# ----------------------------------------------------------------------------- tokenizing


def tokenize(ds: datasets.Dataset, tokenizer: Any, task: str, max_length: int) -> list[dict]:
    """Token ids per example (no padding: batches are padded dynamically by :func:`collate`).

    Causal LM examples are prompt + response + EOS with the prompt's labels masked, so the loss
    is the answer's; the prompt is :func:`fedlora.learning.prompts.render`'s, the one template of a
    run.
    """
    examples: list[dict] = []
    if task == "seq-cls":
        enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
        for ids, label in zip(enc["input_ids"], list(ds["label"]), strict=True):
            examples.append({"input_ids": ids, "labels": int(label)})
        return examples
    from fedlora.learning import prompts

    for instruction, response in zip(list(ds["instruction"]), list(ds["response"]), strict=True):
        prompt_ids, answer_ids = prompts.encode_pair(tokenizer, instruction, response)
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
        if any(label != IGNORE_INDEX for label in labels):
            examples.append({"input_ids": ids, "labels": labels})
    return examples


def collate(batch: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (right padding)."""
    import torch

    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    seq_labels = not isinstance(batch[0]["labels"], int)
    labels = (torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long) if seq_labels
              else torch.tensor([ex["labels"] for ex in batch], dtype=torch.long))
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        mask[i, :n] = 1
        if seq_labels:
            labels[i, :n] = torch.tensor(ex["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
