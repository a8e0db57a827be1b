"""The sweep report's matplotlib plots (PNG files next to ``summary.md``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedlora.experiments.report_data import RuleStats, Series, curves, group
from fedlora.experiments.sweep import Spec


def _save(fig: Any, axes: Any, used: int, title: str, path: Path) -> None:
    """Blank the grid's unused panels (after the first ``used``), title the figure, write it
    to ``path`` and free it."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(spec: Spec, series: list[Series], path: Path, y_key: str, x_key: str | None,
          title: str, ylabel: str, include_baselines: bool, log_y: bool = False) -> None:
    """One panel per setting of ``y_key`` against the round (or ``x_key``), one curve per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    settings = [s.label for s in spec.settings]
    cols = min(3, len(settings))
    rows_n = math.ceil(len(settings) / cols)
    size = (max(7.0, 5.2 * cols), 4.2 * rows_n)
    fig, axes = plt.subplots(rows_n, cols, figsize=size, squeeze=False)
    rows = group(series)
    labels = list(dict.fromkeys(r.label for r in rows if r.kind == "federated"))
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    # distinct markers and dash patterns keep overlapping curves (exact rules at 0) visible
    markers = {label: "osD^vP*X"[i % 8] for i, label in enumerate(labels)}
    dashes = {label: ["-", "--", "-.", ":"][i % 4] for i, label in enumerate(labels)}
    for ax, setting in zip(axes.flat, settings, strict=False):
        for row in [r for r in rows if r.setting == setting]:
            if row.kind == "baseline" and (not include_baselines or x_key is not None):
                continue
            curve = curves(row.runs, x_key, y_key)
            if curve is None:
                continue
            xs, mean, std = curve
            style = dict(linestyle=(0, (5, 2)), color="black" if "central" in row.label
                         else "gray") \
                if row.kind == "baseline" else dict(color=colors[row.label],
                                                    marker=markers[row.label], markersize=4,
                                                    linestyle=dashes[row.label])
            ax.plot(xs, mean, label=row.label, linewidth=1.6, **style)
            if len(row.runs) > 1:
                ax.fill_between(xs, mean - std, mean + std, alpha=0.15,
                                color=style.get("color"))
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel("round" if x_key is None else "cumulative MB (up + down)")
        if x_key is None:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    _save(fig, axes, len(settings), f"{spec.name}: {title}", path)


def write_plots(spec: Spec, series: list[Series], tables: dict[str, list[RuleStats]],
                out: Path) -> list[Path]:
    """Write the sweep's PNG plots into ``out``; the paths written.

    Per setting: the metric per round and against cumulative MB, the aggregation error per round
    (mean ± std over seeds), and the rules' mean rank from ``tables``
    (:func:`fedlora.experiments.report.analysis`).
    """
    metric = spec.metric
    written = []
    jobs = [("metric_vs_round.png", metric, None, f"{metric} per round (mean ± std over seeds)",
             metric, True, False),
            ("metric_vs_bytes.png", metric, "bytes",
             f"{metric} vs communication", metric, False, False),
            ("agg_error_vs_round.png", "agg_error_mean", None,
             "aggregation error ‖ΔW − Σwᵢ·BᵢAᵢ‖ / ‖Σwᵢ·BᵢAᵢ‖",
             "relative error (mean over modules)", False, False)]
    for name, y_key, x_key, title, ylabel, baselines_too, log_y in jobs:
        path = out / name
        _plot(spec, series, path, y_key, x_key, title, ylabel, baselines_too, log_y)
        written.append(path)
    written.append(rank_plot(spec, tables, out / "rank_plot.png"))
    return written


def rank_plot(spec: Spec, tables: dict[str, list[RuleStats]], path: Path) -> Path:
    """Mean rank of each rule per setting (1 = best) with its 95 % CI over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s.label for s in spec.settings]
    cols = min(3, len(settings))
    rows_n = math.ceil(len(settings) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(max(7.0, 5.2 * cols), 3.6 * rows_n),
                             squeeze=False)
    for ax, setting in zip(axes.flat, settings, strict=False):
        ranked = sorted((t for t in tables.get(setting, []) if t.rank is not None),
                        key=lambda t: t.rank.mean)
        for i, t in enumerate(ranked):
            iv = t.rank
            if iv.method != "none":
                ax.errorbar(iv.mean, i, xerr=[[iv.mean - iv.low], [iv.high - iv.mean]],
                            fmt="o", capsize=4, color="tab:blue")
            else:
                ax.plot(iv.mean, i, "o", color="tab:blue")
        ax.set_yticks(range(len(ranked)), [t.label for t in ranked])
        ax.invert_yaxis()
        n = max((t.rank.n for t in ranked), default=0)
        ax.set_xlabel(f"mean rank of final {spec.metric} (1 = best; 95 % CI, n={n} seeds)")
        ax.set_title(setting, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    _save(fig, axes, len(settings), f"{spec.name}: rank of the rules", path)
    return path
