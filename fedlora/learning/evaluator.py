"""Server-side model: the seeded initial adapter, central evaluation and adapter export.

The server keeps one PEFT model of the base. To evaluate any rule the same way — flexlora's
full-rank aggregate, flora's base corrections, hetlora's padded factors — it merges the global
model's total ΔW into the frozen weights (``W0 + ΔW``), zeroes the LoRA factors and loads the
heads. The exported adapter is a plain PEFT adapter carrying the same ΔW, so
``PeftModel.from_pretrained(base, out/"adapter")`` reproduces the reported metrics.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.aggregation import LoraFactors
from fedlora.aggregation.patterns import module_scale
from fedlora.config import RunConfig
from fedlora.federation.global_adapter import GlobalAdapter, join_arrays, split_arrays
from fedlora.learning import builders, data, lora, training
from fedlora.learning.base_init import base_dependent_init
from fedlora.learning.loading import MANIFEST


class ServerModel:
    """The server's copy of the base model with its held-out data."""

    def __init__(self, cfg: RunConfig, max_rank: int) -> None:
        self.cfg = cfg
        base_init = lora.is_base_dependent(cfg.lora.init)
        if base_init:  # the init's rank R is the global model's: the largest configured rank
            max_rank = max(cfg.fl.ranks() or (cfg.lora.r,))
        self.adapter = builders.adapter_spec(cfg, max_rank)
        self.model, self.tokenizer = lora.build_peft_model(builders.model_spec(cfg), self.adapter,
                                                           seed=cfg.fl.seed)
        self.model.eval()
        # PiSSA / OLoRA: computed once here, from the base as this server loaded it
        self.base_init = (base_dependent_init(self.model, self.adapter, cfg.model.task,
                                              cfg.fl.seed) if base_init else {})
        # the server merges ΔW into the frozen weights, so its own LoRA factors stay zero
        arrays = lora.adapter_arrays(self.model)
        self._zero_factors = {k: np.zeros_like(v) for k, v in arrays.items()
                              if k.endswith((lora.LORA_A, lora.LORA_B))}
        heldout = data.heldout(builders.data_spec(cfg))
        self.heldout_rows = 0 if heldout is None else len(heldout)
        self.label_names = _label_names(cfg, heldout)
        self.examples = (None if heldout is None else
                         data.tokenize(heldout, self.tokenizer, cfg.model.task,
                                       cfg.data.max_length))
        # the fixed prompts whose greedy answers samples.jsonl follows round by round
        self.sample_rows = ([] if heldout is None or cfg.model.task != "causal-lm" else
                            [{"instruction": q, "reference": a} for q, a in zip(
                                heldout["instruction"][:cfg.eval.samples],
                                heldout["response"][:cfg.eval.samples], strict=True)])

    def describe_evaluation(self) -> str:
        """One start-up line: what the server evaluates on, and whether clients evaluate."""
        reason = no_evaluation_reason(self.cfg, bool(self.examples))
        if reason:
            return reason
        d = self.cfg.data
        where = (f"{self.heldout_rows} rows of {d.heldout_path} (data.heldout-path, whole)"
                 if d.heldout_path else
                 f"{self.heldout_rows} held-out rows of {d.source}" if self.examples else
                 "no server-side data")
        federated = ("; clients evaluate on their own held-out split too"
                     if federated_evaluation(self.cfg) else "")
        return f"central evaluation on {where}{federated}"

    def initial_global(self) -> GlobalAdapter:
        """The seeded initial adapter (largest rank; smaller ranks get its leading slice)."""
        arrays = lora.adapter_arrays(self.model)
        for module, (a, b) in self.base_init.items():
            arrays[module + lora.LORA_A], arrays[module + lora.LORA_B] = a, b
        pattern = builders.module_pattern(self.cfg)
        factors, heads = split_arrays(arrays, lambda module, rank: module_scale(
            pattern, module, rank, self.adapter.alpha, self.adapter.use_rslora))
        return GlobalAdapter(factors, heads, self.adapter.alpha, self.adapter.use_rslora,
                             base_init=bool(self.base_init), pattern=pattern)

    def _load(self, glob: GlobalAdapter) -> None:
        total = glob.export_factors()
        lora.load_adapter_arrays(self.model, {**self._zero_factors, **glob.heads})
        lora.set_base_delta(self.model, {m: (f.b, f.a) for m, f in total.items()},
                            tag=("global", glob.updates))

    def evaluate(self, glob: GlobalAdapter) -> dict[str, float] | None:
        """Held-out metrics of the global model (``None`` without server-side data)."""
        if not self.examples:
            return None
        self._load(glob)
        return training.evaluate(self.model, self.examples, self.cfg.eval.batch_size,
                                 self.tokenizer.pad_token_id, self.cfg.model.task)

    def samples(self, glob: GlobalAdapter) -> list[dict[str, str]]:
        """Greedy answers of the global model to the first ``eval.samples`` held-out prompts
        (rendered with :func:`fedlora.learning.prompts.render`, the training template), at most
        ``eval.sample-tokens`` new tokens each, decoded without special tokens."""
        import torch

        from fedlora.learning import prompts

        if not self.sample_rows:
            return []
        self._load(glob)
        out = []
        for row in self.sample_rows:
            ids = prompts.encode_prompt(self.tokenizer,
                                        prompts.render(self.tokenizer, row["instruction"]))
            ids = ids[-self.cfg.data.max_length:]
            device = next(self.model.parameters()).device
            with torch.no_grad():
                gen = self.model.generate(
                    input_ids=torch.tensor([ids], device=device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                    max_new_tokens=self.cfg.eval.sample_tokens, do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id)
            answer = self.tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True)
            out.append({**row, "answer": answer.strip()})
        return out

    def lm_eval(self, glob: GlobalAdapter, directory: Path) -> dict[str, Any]:
        """``eval.tasks`` on the global model as the server holds it (base corrections and
        ΔW merged into the frozen weights), results to ``directory/<task>.json``."""
        from fedlora.learning import lmeval

        self._load(glob)
        limit = self.cfg.eval.tasks_limit or None
        results = lmeval.evaluate(self.model.get_base_model(), self.tokenizer,
                                  builders.model_spec(self.cfg).path, self.cfg.eval.task_list(),
                                  limit=limit, batch_size=self.cfg.eval.batch_size,
                                  device=str(next(self.model.parameters()).device))
        lmeval.write(results, directory, {"updates": glob.updates, "limit": limit})
        return results

    def export(self, glob: GlobalAdapter, directory: Path) -> Path:
        """Save the global model as a PEFT adapter directory (ΔW as LoRA factors + heads)."""
        total = glob.export_factors()
        if not total:  # no round finished: the initial adapter (B = 0 unless a base init)
            total = {m: LoraFactors(a=f.a, b=f.scale * f.b, scale=1.0)
                     for m, f in glob.view(self.adapter.r).items()}
        spec, ranks = export_spec(builders.adapter_spec(self.cfg, 1), total,
                                  per_module=builders.module_pattern(self.cfg) is not None)
        rank = spec.r
        padded = {m: LoraFactors(a=_pad(f.a, ranks[m], 0), b=_pad(f.b, ranks[m], 1), scale=1.0)
                  for m, f in total.items()}
        base, _ = lora.load_base(builders.model_spec(self.cfg))
        from peft import get_peft_model

        model = get_peft_model(base, lora.peft_config(spec, self.cfg.model.task))
        lora.load_adapter_arrays(model, join_arrays(padded, glob.heads))
        lora.save_adapter(model, directory)
        self.tokenizer.save_pretrained(directory)
        (directory / MANIFEST).write_text(json.dumps(
            manifest(self.cfg, rank, self.label_names), indent=2))
        return directory


class RoundExtras:
    """What the server adds after each round's metrics line: ``samples.jsonl`` (greedy answers
    to the fixed held-out prompts, causal-LM runs) and, every ``eval.tasks-every`` rounds,
    ``eval.tasks`` to ``eval/round-<r>/``. One sample line per prompt: round, instruction,
    reference answer, the model's answer."""

    def __init__(self, server_model: ServerModel, run_dir: Path) -> None:
        self.model = server_model
        self.dir = Path(run_dir)
        self.samples_path = self.dir / "samples.jsonl"

    def __call__(self, server_round: int, glob: GlobalAdapter) -> None:
        cfg = self.model.cfg
        rows = self.model.samples(glob) if cfg.eval.samples else []
        if rows:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self.samples_path.open("a") as fh:
                for i, row in enumerate(rows):
                    fh.write(json.dumps({"round": server_round, "prompt": i, **row}) + "\n")
        every = cfg.eval.tasks_every
        if cfg.eval.task_list() and every and server_round > 0 and server_round % every == 0:
            self.model.lm_eval(glob, self.dir / "eval" / f"round-{server_round}")

    def final(self, adapter_dir: Path) -> dict[str, Any] | None:
        """``eval.tasks`` on the exported adapter (merged, as ``fedlora eval`` loads it), to
        ``eval/<task>.json``; ``None`` without ``eval.tasks``."""
        cfg = self.model.cfg
        if not cfg.eval.task_list():
            return None
        from fedlora.learning import lmeval

        model, tokenizer, tokenizer_dir = lmeval.load(adapter_dir)
        limit = cfg.eval.tasks_limit or None
        results = lmeval.evaluate(model, tokenizer, tokenizer_dir, cfg.eval.task_list(),
                                  limit=limit, batch_size=cfg.eval.batch_size)
        lmeval.write(results, self.dir / "eval", {"model": str(adapter_dir), "limit": limit})
        return results


MANIFEST_VERSION = 2  # of adapter/fedlora.json (1: strategy, rank, base_model, num_labels)


def manifest(cfg: RunConfig, rank: int, label_names: list[str] | None) -> dict[str, Any]:
    """Everything :func:`fedlora.load_model` needs to rebuild the model as it was trained:
    the base (as named and as resolved here), task, labels, layer truncation, dtype and
    quantization of the base, tokenization length, and the ranks of the run."""
    from fedlora.learning import assets

    n_labels = builders.num_labels(cfg)
    return {
        "format": MANIFEST_VERSION,
        "strategy": cfg.fl.strategy,
        "base_model": cfg.model.name,
        "base_model_path": assets.resolve_model(cfg.model.name),
        "task": cfg.model.task,
        "num_labels": n_labels,
        "label_names": label_names,
        "num_hidden_layers": cfg.model.num_hidden_layers,
        "dtype": cfg.model.dtype,
        "quantization": cfg.model.quantization,
        "max_length": cfg.data.max_length,
        "rank": rank,  # of the exported adapter (lora_alpha = rank: scale 1)
        "lora_r": cfg.lora.r,
        "rank_by_partition": list(cfg.fl.ranks()),
        "max_rank": cfg.fl.max_rank,
    }


def _label_names(cfg: RunConfig, heldout: Any) -> list[str] | None:
    """Class names: the packaged corpus's, else those of a held-out file with string labels."""
    if cfg.model.task != "seq-cls":
        return None
    names = data.label_names(builders.data_spec(cfg))
    if names is None and heldout is not None:
        import datasets

        feature = heldout.features.get("label")
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
    return names


def federated_evaluation(cfg: RunConfig) -> bool:
    """Do clients evaluate each round? With ``fraction-evaluate`` > 0, and with FedSA, whose
    personal B only the clients hold (``server/round/plan.py`` ``round_plan``)."""
    return cfg.fl.fraction_evaluate > 0 or cfg.fl.strategy == "fedsa"


def no_evaluation_reason(cfg: RunConfig, server_has_data: bool) -> str | None:
    """The warning for a run that evaluates nothing (``None`` when something is evaluated)."""
    if server_has_data or federated_evaluation(cfg):
        return None
    if cfg.data.source != "files":
        why = "the server has no held-out data"
    elif not cfg.data.path:
        why = "each node names its own file (node config data-path), the server has none"
    elif data.PARTITION_TEMPLATE in cfg.data.path:
        why = f"data.path {cfg.data.path!r} names the clients' files ({data.PARTITION_TEMPLATE})"
    else:
        why = f"the server cannot read data.path {cfg.data.path!r}"
    return (f"no evaluation: {why} and fraction-evaluate = 0, so metrics.jsonl will hold "
            f"train loss only. Set data.heldout-path to a held-out file the server can read "
            f"(evaluated whole), or fraction-evaluate > 0 for the clients to evaluate on "
            f"their own held-out split")


def export_spec(spec: lora.AdapterSpec, total: dict[str, LoraFactors], *, per_module: bool
                ) -> tuple[lora.AdapterSpec, dict[str, int]]:
    """The exported adapter's config and each module's rank, for scale-1 factors ``total``.

    ``r`` is the largest module rank and ``lora_alpha = r`` (``sqrt(r)`` with rsLoRA), so the
    scale is 1 and B carries ΔW's. ``per_module`` (a run with a rank or alpha pattern): each
    module keeps its own rank, written to peft's ``rank_pattern`` with the matching
    ``alpha_pattern`` (scale 1 again) under its exact escaped name, so
    ``PeftModel.from_pretrained`` rebuilds every module's shape; otherwise every module is
    zero-padded to ``r`` (the product is unchanged)."""
    import re

    def one(r: int) -> float:
        return float(r**0.5 if spec.use_rslora else r)

    rank = max(f.rank for f in total.values())
    ranks = {m: (f.rank if per_module else rank) for m, f in total.items()}
    keys = {re.escape(m.removeprefix("base_model.model.")): r for m, r in ranks.items()
            if r != rank}
    spec = replace(spec, r=rank, alpha=one(rank), rank_pattern=tuple(keys.items()),
                   alpha_pattern=tuple((k, one(r)) for k, r in keys.items()))
    return spec, ranks


def _pad(x: np.ndarray, rank: int, axis: int) -> np.ndarray:
    width = [(0, 0), (0, 0)]
    width[axis] = (0, rank - x.shape[axis])
    return np.pad(np.asarray(x, np.float32), width)


def load_exported(adapter_dir: str | Path, cfg: RunConfig) -> tuple[Any, Any]:
    """Load an exported adapter onto a fresh base with ``PeftModel.from_pretrained``."""
    from peft import PeftModel

    base, tokenizer = lora.load_base(builders.model_spec(cfg))
    return PeftModel.from_pretrained(base, str(adapter_dir)), tokenizer
