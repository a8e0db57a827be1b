"""Aggregation-strategy experiments: a sweep spec → cells → real federated runs → a report.

A spec (TOML) declares one base config and a grid::

    name = "non-iid"
    preset = "bbc-minilm"           # or config = "path/to/config.toml"
    seeds = [0, 1]
    metric = "eval_accuracy"        # what the report compares (higher is better for accuracy)
    target = 0.8                    # rounds-to-target column
    reference = "fedit+fedadam"     # the strategy every other rule is compared with, by seed
    baselines = ["centralized", "local"]
    engine = "inprocess"            # or "simulation": every cell on Flower's simulation engine

    [base]                          # run-config keys for every cell (plus num-clients)
    num-server-rounds = 4

    [[strategies]]                  # the compared arms: a label and its run-config keys
    label = "fedit+fedadam"
    strategy = "fedit"
    server-optimizer = "fedadam"

    [[settings]]                    # data / client settings: a label and run-config keys
    label = "dirichlet"
    data.partitioner = "dirichlet"

    [grid]                          # optional: every combination, crossed with the settings
    data.dirichlet-alpha = [100.0, 1.0, 0.1]

Cells are settings × strategies × seeds. A cell's config is layered
defaults ← preset ← base ← setting ← strategy ← seed, so every strategy of a setting and seed
sees the identical data split and initial adapter. Each cell runs in ``OUT/cells/<cell>/``:
by default (``engine = "inprocess"``) the real ServerApp against the real ClientApp in the
sweep's own process (:mod:`fedlora.experiments.engine`), or with ``engine = "simulation"`` as a
Flower simulation on Ray (one SuperLink per sweep). Its ``cell.json`` records ``done`` or
``failed`` with the error, and ``--resume`` skips the cells that are done. Baselines run once
per setting × seed.

``reference`` (default: the first strategy) is what the report's paired statistics compare every
other rule with (:mod:`fedlora.experiments.stats`). ``fedlora experiment --seeds N`` overrides the
spec's
seeds (:func:`with_seeds`); the seeds run are recorded in ``OUT/overrides.json`` so that
``fedlora report OUT`` rebuilds the same report. ``OUT/timing.json`` holds the sweep's wall
time and the time spent writing reports, for the overhead section of ``summary.md``.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora import config
from fedlora.errors import FedLoraError
from fedlora.runtime.run_setup import flatten

SPEC_KEYS = {"name", "description", "preset", "config", "seeds", "metric", "target",
             "reference", "baselines", "cpus-per-client", "engine", "base", "strategies",
             "settings", "grid"}
ENGINES = ("inprocess", "simulation")  # see fedlora.experiments.engine
BASELINES = ("centralized", "local")
CELL_KEYS = {"num-clients"}  # keys a layer may set besides run-config keys


class SpecError(FedLoraError):
    """The experiment spec is invalid."""


@dataclass(frozen=True)
class Arm:
    """A labelled layer of run-config keys (a strategy or a setting)."""

    label: str
    keys: dict[str, Any]


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a setting, a strategy and a seed."""
    setting: Arm
    strategy: Arm
    seed: int

    @property
    def id(self) -> str:
        """The cell's directory name, ``<setting>--<strategy>--seed<seed>`` (slugs)."""
        return f"{slug(self.setting.label)}--{slug(self.strategy.label)}--seed{self.seed}"


@dataclass
class Spec:
    """A parsed experiment spec: base config, strategy and setting arms, seeds, the metric
    (and target) reported, the reference rule, baselines and per-client CPUs.
    """
    name: str
    description: str
    base: dict[str, Any]
    strategies: list[Arm]
    settings: list[Arm]
    seeds: list[int]
    metric: str = "eval_accuracy"
    target: float | None = None
    reference: str = ""
    baselines: tuple[str, ...] = BASELINES
    cpus_per_client: float = 1.0
    engine: str = "inprocess"
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger ``metric`` is better (not for losses, perplexities and errors)."""
        return not any(word in self.metric for word in ("loss", "perplexity", "error"))

    def cells(self) -> list[Cell]:
        """Every (setting, strategy, seed) combination, settings outermost."""
        return [Cell(setting, strategy, seed) for setting in self.settings
                for strategy in self.strategies for seed in self.seeds]

    def flat_config(self, setting: Arm, strategy: Arm | None, seed: int, out: Path
                    ) -> tuple[dict[str, Any], int]:
        """The cell's complete flat run config and its number of clients."""
        flat = config.defaults()
        for layer in (self.base, setting.keys, strategy.keys if strategy else {}):
            flat.update(layer)
        clients = int(flat["num-clients"])
        flat["seed"] = seed
        flat["output-dir"] = str(out)
        return flat, clients


def slug(text: str) -> str:
    """A directory name for a label: Greek letters spelled out (σ → sigma), then ASCII only."""
    text = "".join(unicodedata.name(c, "").rsplit(" ", 1)[-1].lower()
                   if unicodedata.name(c, "").startswith("GREEK") else c for c in text)
    return re.sub(r"[^A-Za-z0-9.=+-]+", "-", text).strip("-").lower() or "x"


def _check_keys(keys: dict[str, Any], where: str) -> None:
    known = set(config.schema()) | CELL_KEYS
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `fedlora config`"
            raise SpecError(f"{where}: unknown run-config key {key!r}{hint}")


def _arms(entries: Any, what: str) -> list[Arm]:
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"[[{what}]] must be a non-empty array of tables, each with a label; "
                        f"got {entries!r}")
    arms = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise SpecError(f"[[{what}]] entry {i} must be a table; got {entry!r}")
        keys = flatten(entry)
        label = str(keys.pop("label", "") or (keys.get("strategy") if what == "strategies"
                                              else f"{what[:-1]}-{i}"))
        _check_keys(keys, f"[[{what}]] {label!r}")
        arms.append(Arm(label, keys))
    labels = [a.label for a in arms]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise SpecError(f"[[{what}]] labels must be unique; repeated: {duplicates}")
    return arms


def _grid(settings: list[Arm], grid: dict[str, Any]) -> list[Arm]:
    axes = flatten(grid)
    _check_keys(axes, "[grid]")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"[grid] {key} must be a non-empty list of values; got {values!r}")
    crossed = []
    for setting in settings:
        for combo in itertools.product(*axes.values()):
            extra = dict(zip(axes, combo, strict=True))
            tag = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in extra.items())
            label = f"{setting.label} {tag}".strip() if setting.label else tag
            crossed.append(Arm(label, {**setting.keys, **extra}))
    return crossed


def parse_spec(text: str, path: Path | None = None) -> Spec:
    """Validate a spec's TOML text (every error says where and what to change)."""
    where = str(path) if path else "spec"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{where} is not valid TOML: {exc}") from exc
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise SpecError(f"{where}: unknown top-level key(s) {unknown}; allowed: "
                        f"{', '.join(sorted(SPEC_KEYS))}")
    from fedlora.runtime import run_setup

    base_dir = path.parent if path else Path.cwd()
    config_file = raw.get("config")
    if config_file and not Path(config_file).is_absolute():
        config_file = base_dir / config_file
    base = run_setup.preset_layer(raw.get("preset"), config_file)
    extra = flatten(raw.get("base", {}))
    _check_keys(extra, "[base]")
    base.update(extra)
    strategies = _arms(raw.get("strategies"), "strategies")
    settings = _arms(raw["settings"], "settings") if "settings" in raw else [Arm("", {})]
    if raw.get("grid"):
        settings = _grid(settings, raw["grid"])
    if len(settings) == 1 and not settings[0].label:
        settings = [Arm("default", settings[0].keys)]
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise SpecError(f"{where}: seeds must be a non-empty list of integers; got {seeds!r}")
    engine = str(raw.get("engine", "inprocess"))
    if engine not in ENGINES:
        raise SpecError(f"{where}: engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    baselines = tuple(raw.get("baselines", BASELINES))
    bad = sorted(set(baselines) - set(BASELINES))
    if bad:
        raise SpecError(f"{where}: unknown baseline(s) {bad}; available: {', '.join(BASELINES)}")
    spec = Spec(name=str(raw.get("name") or (path.stem if path else "experiment")),
                description=str(raw.get("description", "")), base=base,
                strategies=strategies, settings=settings, seeds=list(seeds),
                metric=str(raw.get("metric", "eval_accuracy")), target=raw.get("target"),
                baselines=baselines, cpus_per_client=float(raw.get("cpus-per-client", 1.0)),
                engine=engine, path=path, raw=raw)
    reference = raw.get("reference", strategies[0].label)
    labels = [a.label for a in strategies]
    if reference not in labels:
        raise SpecError(f"{where}: reference {reference!r} is not a strategy label; "
                        f"use one of {labels}")
    spec.reference = str(reference)
    for cell in spec.cells():  # every cell's config parses (types, ranges) before any runs
        flat, _ = spec.flat_config(cell.setting, cell.strategy, cell.seed, Path("/tmp"))
        try:
            config.from_flat(flat)
        except FedLoraError as exc:
            raise SpecError(f"{where}: cell {cell.id}: {exc}") from exc
    return spec


def with_seeds(spec: Spec, count: int) -> Spec:
    """The spec with ``count`` seeds: its own, cut or extended by the next unused integers."""
    if count < 1:
        raise SpecError(f"--seeds must be >= 1; got {count}")
    seeds = list(spec.seeds[:count])
    candidate = 0
    while len(seeds) < count:
        if candidate not in seeds:
            seeds.append(candidate)
        candidate += 1
    spec.seeds = seeds
    return spec


def set_reference(spec: Spec, label: str) -> Spec:
    """Compare every rule with the strategy labelled ``label``; ``spec``, changed. Raises
    :class:`SpecError` listing the labels when there is none such.
    """
    labels = [a.label for a in spec.strategies]
    if label not in labels:
        raise SpecError(f"reference {label!r} is not a strategy label of {spec.name!r}; "
                        f"use one of {labels}")
    spec.reference = label
    return spec


def load_output_spec(out: Path) -> Spec:
    """The spec an experiment ran with, from its output directory (``spec.toml`` and the
    ``--seeds`` override in ``overrides.json``)."""
    path = out / "spec.toml"
    if not path.exists():
        raise SpecError(f"{out} is not an experiment's output directory (it has no spec.toml); "
                        f"pass the --out of a `fedlora experiment`")
    spec = parse_spec(path.read_text(), path.resolve())
    overrides = _read_json(out / "overrides.json") or {}
    if overrides.get("seeds"):
        spec.seeds = [int(s) for s in overrides["seeds"]]
    return spec


def load_spec(path: str | Path) -> Spec:
    """Parse the experiment spec TOML at ``path``; :class:`SpecError` if it does not exist."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SpecError(f"experiment spec {str(path)!r} does not exist")
    return parse_spec(path.read_text(), path.resolve())


# ---------------------------------------------------------------------------------------------
# running


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def cell_status(directory: Path) -> dict[str, Any] | None:
    """The ``cell.json`` of a cell or baseline directory, or ``None`` while there is none."""
    return _read_json(directory / "cell.json")
