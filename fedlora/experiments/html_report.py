"""``report.html``: the experiment's interactive plots and tables in one self-contained page.

The page embeds plotly.js from the ``plotly`` pip package (``plotly.offline.get_plotlyjs``), so
it opens offline: no CDN, no fonts or scripts fetched from anywhere. Per setting it shows the
metric against rounds and against cumulative bytes (mean over seeds, the band ± one standard
deviation), the aggregation error, the effective rank of the aggregate (every numeric
``effective_rank*`` metric the runs logged, e.g. ``effective_rank_mean`` or per-tier keys such
as ``effective_rank_tier4``), the paired differences from the reference with their CIs and the
rank plot with CIs; then ``summary.md``'s tables.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlora.experiments.report_data import RuleStats, Series
    from fedlora.experiments.sweep import Spec

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]
RANK_KEY = re.compile(r"^effective_rank(_\w+)?$")


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _curve_traces(rows: list[Any], x_key: str | None, y_key: str, colors: dict[str, str],
                  baselines: bool, name_suffix: str = "", dash: str = "solid"
                  ) -> list[dict[str, Any]]:
    from fedlora.experiments.report_data import curves

    traces = []
    for row in rows:
        if row.kind == "baseline" and (not baselines or x_key is not None):
            continue
        curve = curves(row.runs, x_key, y_key)
        if curve is None:
            continue
        xs, mean, std = (list(map(float, a)) for a in curve)
        color = colors.get(row.label, "#444444")
        name = row.label + name_suffix
        line_dash = "dash" if row.kind == "baseline" else dash
        traces.append({"type": "scatter", "mode": "lines+markers", "name": name, "x": xs,
                       "y": mean, "line": {"color": color, "dash": line_dash}, "legendgroup": name})
        if len(row.runs) > 1:
            traces.append({"type": "scatter", "mode": "lines", "x": xs + xs[::-1],
                           "y": [m + s for m, s in zip(mean, std, strict=True)]
                           + [m - s for m, s in zip(mean[::-1], std[::-1], strict=True)],
                           "fill": "toself", "fillcolor": _rgba(color, 0.15),
                           "line": {"width": 0}, "hoverinfo": "skip", "showlegend": False,
                           "legendgroup": name})
    return traces


def _rank_keys(rows: list[Any]) -> list[str]:
    keys = {k for row in rows for s in row.runs for rec in s.records for k, v in rec.items()
            if RANK_KEY.match(k) and isinstance(v, int | float) and not isinstance(v, bool)}
    return sorted(keys)


def _flatten_tiers(series: list[Series]) -> None:
    """The server logs what each rank tier receives as ``tier_effective_rank = {"4": …}``;
    the plots read one number per key: ``effective_rank_tier4``, … (added in place)."""
    for s in series:
        for rec in s.records:
            tiers = rec.get("tier_effective_rank")
            if isinstance(tiers, dict):
                for tier, value in tiers.items():
                    rec.setdefault(f"effective_rank_tier{tier}", value)


def figures(spec: Spec, series: list[Series], tables: dict[str, list[RuleStats]]
            ) -> list[tuple[str, str, dict[str, Any]]]:
    """(setting, title, plotly figure as a dict) for every plot of the page."""
    from fedlora.experiments.report_data import group

    _flatten_tiers(series)
    rows = group(series)
    labels = list(dict.fromkeys(r.label for r in rows))
    colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    metric = spec.metric
    out = []
    for setting in spec.settings:
        mine = [r for r in rows if r.setting == setting.label]
        if not mine:
            continue

        def fig(traces: list[dict[str, Any]], xtitle: str, ytitle: str, log: bool = False,
                **layout: Any) -> dict[str, Any]:
            yaxis = {"title": {"text": ytitle}, "automargin": True,
                     **({"type": "log"} if log else {}), **layout.pop("yaxis", {})}
            return {"data": traces, "layout": {
                "xaxis": {"title": {"text": xtitle}, "automargin": True}, "yaxis": yaxis,
                "margin": {"t": 30, "l": 60, "r": 20, "b": 50}, "height": 380,
                "hovermode": "closest", **layout}}

        out.append((setting.label, f"{metric} per round (mean ± std over seeds)",
                    fig(_curve_traces(mine, None, metric, colors, True), "round", metric)))
        out.append((setting.label, f"{metric} vs communication",
                    fig(_curve_traces(mine, "bytes", metric, colors, False),
                        "cumulative MB (up + down)", metric)))
        agg = _curve_traces(mine, None, "agg_error_mean", colors, False)
        if agg:
            out.append((setting.label, "aggregation error ‖ΔW − Σwᵢ·BᵢAᵢ‖ / ‖Σwᵢ·BᵢAᵢ‖",
                        fig(agg, "round", "relative error (mean over modules)", log=True)))
        keys = _rank_keys(mine)
        if keys:
            traces = []
            dashes = ["solid", "dot", "dashdot", "longdash", "dash"]
            for i, key in enumerate(keys):  # a colour per rule, a dash pattern per tier
                suffix = "" if len(keys) == 1 else f" · {key.removeprefix('effective_rank_')}"
                traces += _curve_traces(mine, None, key, colors, False, suffix,
                                        dashes[i % len(dashes)])
            out.append((setting.label, "effective rank of the aggregate"
                        + (" per tier" if len(keys) > 1 else ""),
                        fig(traces, "round", "effective rank")))
        table = tables.get(setting.label, [])
        compared = [t for t in table if t.comparison is not None and t.comparison.final.n]
        if compared:
            ys = [t.label for t in compared]
            means = [t.comparison.final.mean for t in compared]
            has_ci = [t.comparison.final.method != "none" for t in compared]
            plus = [t.comparison.final.high - t.comparison.final.mean if ok else 0
                    for t, ok in zip(compared, has_ci, strict=True)]
            minus = [t.comparison.final.mean - t.comparison.final.low if ok else 0
                     for t, ok in zip(compared, has_ci, strict=True)]
            trace = {"type": "scatter", "mode": "markers", "x": means, "y": ys,
                     "name": f"Δ final {metric}", "marker": {"size": 9},
                     "error_x": {"type": "data", "array": plus, "arrayminus": minus,
                                 "visible": True},
                     "text": [t.comparison.final_call for t in compared],
                     "hovertemplate": "%{y}: Δ=%{x:.4f} (%{text})<extra></extra>"}
            out.append((setting.label, f"paired Δ final {metric} vs {spec.reference} (95 % CI)",
                        fig([trace], f"Δ final {metric} (rule − {spec.reference})", "",
                            shapes=[{"type": "line", "x0": 0, "x1": 0, "yref": "paper",
                                     "y0": 0, "y1": 1, "line": {"dash": "dot"}}])))
        ranked = sorted((t for t in table if t.rank is not None), key=lambda t: t.rank.mean)
        if ranked:
            ok = [t.rank.method != "none" for t in ranked]
            trace = {"type": "scatter", "mode": "markers", "name": "mean rank",
                     "x": [t.rank.mean for t in ranked], "y": [t.label for t in ranked],
                     "marker": {"size": 9, "color": [colors.get(t.label) for t in ranked]},
                     "error_x": {"type": "data", "visible": True, "color": "#444444",
                                 "array": [t.rank.high - t.rank.mean if o else 0
                                           for t, o in zip(ranked, ok, strict=True)],
                                 "arrayminus": [t.rank.mean - t.rank.low if o else 0
                                                for t, o in zip(ranked, ok, strict=True)]}}
            n = max(t.rank.n for t in ranked)
            out.append((setting.label, f"rank of the rules (1 = best, 95 % CI, n={n} seeds)",
                        fig([trace], f"mean rank of final {metric}", "",
                            yaxis={"autorange": "reversed"})))
    return out


def _markdown_tables(markdown: str) -> str:
    """The summary's headings, paragraphs and pipe tables as HTML (a small subset of
    Markdown: enough for what :func:`fedlora.experiments.report.summary_markdown` writes)."""
    parts, table = [], []

    def flush() -> None:
        if not table:
            return
        cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table
                 if not set(line.replace("|", "").strip()) <= set("-: ")]
        head, *body = cells
        parts.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head)
                     + "</tr></thead><tbody>" + "".join(
                         "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                         for row in body) + "</tbody></table>")
        table.clear()

    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            flush()
            in_code = not in_code
            parts.append("<pre>" if in_code else "</pre>")
            continue
        if in_code:
            parts.append(html.escape(line))
            continue
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("<details>") or line.startswith("</details>"):
            parts.append(line)
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            parts.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            parts.append(f"<p>{_inline(line.lstrip('- '))}</p>")
    flush()
    return "\n".join(parts)


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", text)


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f3f3f3}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:10px}
.plot{border:1px solid #e3e3e3;padding:4px}.plot h4{margin:4px 8px;font-size:13px}
pre{background:#f7f7f7;padding:6px;font-size:12px}code{background:#f3f3f3}"""


def render(spec: Spec, series: list[Series], tables: dict[str, list[RuleStats]],
           summary_md: str) -> str:
    """The whole page as one string (plotly.js inline)."""
    from plotly.offline import get_plotlyjs

    sections, scripts = [], []
    by_setting: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for setting, title, figure in figures(spec, series, tables):
        by_setting.setdefault(setting, []).append((title, figure))
    for i, (setting, figs) in enumerate(by_setting.items()):
        divs = []
        for j, (title, figure) in enumerate(figs):
            div = f"plot-{i}-{j}"
            divs.append(f'<div class="plot"><h4>{html.escape(title)}</h4>'
                        f'<div id="{div}" class="plotly-div"></div></div>')
            payload = json.dumps(figure).replace("</", "<\\/")
            scripts.append(f"(function (f) {{ Plotly.newPlot({json.dumps(div)}, f.data, "
                           f"f.layout, {{responsive: true, displaylogo: false}}); }})"
                           f"({payload});")
        sections.append(f"<h2>{html.escape(setting)}</h2><div class=\"grid\">"
                        + "".join(divs) + "</div>")
    plotly_js = get_plotlyjs().replace("</script", "<\\/script")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(spec.name)}: experiment report</title>"
            f"<style>{STYLE}</style><script>{plotly_js}</script></head><body>"
            f"<h1>Experiment <code>{html.escape(spec.name)}</code></h1>"
            + "".join(sections)
            + "<h2>Summary</h2>" + _markdown_tables(summary_md.split("\n", 1)[-1])
            + f"<script>{chr(10).join(scripts)}</script></body></html>\n")


def write(spec: Spec, series: list[Series], tables: dict[str, list[RuleStats]], out: Path
          ) -> Path:
    """Write ``out/report.html`` (atomically, through a temporary file) from the series, the
    analysis tables and ``out/summary.md``; its path.
    """
    path = out / "report.html"
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render(spec, series, tables, summary))
    tmp.replace(path)
    return path
