"""Plan reports: a per-parameter table, a JSON summary, and HTML and PNG drawings.

Each drawing shows a parameter as a grid of blocks. Rows follow axis 0 and columns axis 1,
and later axes are not split. Each block is coloured by what happens to its elements:
copied, gathered (moved, permuted or replicated), or the rule that initialises it. Block sizes
are proportional to index counts, so drawing never builds per-element tensors.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pipeline.plan.model import ParamPlan, Plan, count_elements

COLOURS = {
    "copy": "#3d8b37",
    "gather": "#2f6fb0",
    "fold": "#8c5a2b",
    "zero": "#b8b8b8",
    "ones": "#5f7f9f",
    "mask": "#c0392b",
    "uniform": "#e69f00",
    "normal": "#f0c050",
    "constant": "#7f7f7f",
    "eye": "#1b9e9e",
    "mean_rows": "#8e44ad",
    "copy_row": "#b07cc6",
}
LABELS = {
    "copy": "copied",
    "gather": "gathered",
    "fold": "copied + folded constant",
    "zero": "init: zero",
    "ones": "init: ones",
    "mask": "init: mask (large negative bias)",
    "uniform": "init: uniform (default scale)",
    "normal": "init: normal",
    "constant": "init: constant",
    "eye": "init: identity",
    "mean_rows": "init: mean of rows",
    "copy_row": "init: copy of a row",
}


def action_of(pp: ParamPlan) -> str:
    """Name what happens to a tensor: copy, gather, init:RULE, fold, or several joined by '+'."""
    if pp.tied_to is not None:
        return f"tied to {pp.tied_to}"
    counts = count_elements(pp)
    parts = []
    if counts.copied:
        parts.append("copy")
    if counts.gathered:
        parts.append("gather")
    if pp.folds:
        parts.append("fold")
    parts.extend(f"init:{rule}" for rule, _ in counts.initialised)
    return "+".join(parts) or "empty"


def summarise_plan(plan: Plan) -> dict[str, Any]:
    """Return per-parameter counts and totals as plain JSON values."""
    rows = []
    total = transferred = 0
    by_rule: dict[str, int] = {}
    for pp in plan.params:
        counts = count_elements(pp)
        row = {
            "name": pp.name,
            "kind": pp.kind,
            "shape": list(pp.shape),
            "source": pp.source,
            "action": action_of(pp),
            "elements": counts.total,
            "copied": counts.copied,
            "gathered": counts.gathered,
            "initialised": dict(counts.initialised),
            "folded": counts.folded,
            "dropped": counts.dropped,
            "exact": pp.exact,
            "notes": list(pp.notes),
        }
        rows.append(row)
        if pp.tied_to is None:
            total += counts.total
            transferred += counts.copied + counts.gathered
            for rule, n in counts.initialised:
                by_rule[rule] = by_rule.get(rule, 0) + n
    dropped_elements = sum(r["dropped"] for r in rows)
    for d in plan.dropped:
        n = 1
        for s in d.shape:
            n *= s
        dropped_elements += n
    return {
        "sha256": plan.sha256(),
        "exact": plan.exact,
        "expected_error": plan.expected_error,
        "elements": total,
        "transferred": transferred,
        "transferred_share": transferred / total if total else 1.0,
        "initialised": by_rule,
        "dropped_elements": dropped_elements,
        "dropped_params": [d.to_json() for d in plan.dropped],
        "renames": dict(plan.renames),
        "constants": dict(plan.constants),
        "notes": list(plan.notes),
        "params": rows,
    }


def format_table(summary: dict[str, Any]) -> str:
    """Render a summary as a fixed-width table with totals."""
    header = f"{'parameter':<34} {'shape':<11} {'action':<36} {'copied':>10} {'gathered':>10} {'dropped':>9}  initialised (rule)"
    lines = [header, "-" * len(header)]
    for row in summary["params"]:
        shape = "x".join(str(s) for s in row["shape"]) or "scalar"
        init = ", ".join(f"{rule}:{n}" for rule, n in row["initialised"].items()) or "0"
        lines.append(
            f"{row['name']:<34} {shape:<11} {row['action']:<36} {row['copied']:>10} {row['gathered']:>10} "
            f"{row['dropped']:>9}  {init}"
        )
    for dropped in summary["dropped_params"]:
        shape = "x".join(str(s) for s in dropped["shape"]) or "scalar"
        lines.append(f"{dropped['name']:<34} {shape:<11} {'dropped (old only)':<36}")
    lines.append("-" * len(header))
    kind = "exact" if summary["exact"] else f"APPROXIMATE (estimated relative error {summary['expected_error']:.2g})"
    lines.append(
        f"{summary['transferred']} of {summary['elements']} elements transferred "
        f"({100 * summary['transferred_share']:.2f}%); {summary['dropped_elements']} old elements dropped; "
        f"plan {kind}; sha256 {summary['sha256'][:16]}"
    )
    for note in summary["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# Drawing ------------------------------------------------------------------------------------


def _segments(pp: ParamPlan, axis: int) -> list[tuple[int, int, str]]:
    """Split one axis into (start, stop, status) where status is 'copy', 'gather' or 'new',
    cut also at every region boundary so that each block has a single colour."""
    plan = pp.axes[axis]
    cuts = {0, plan.size}
    status_runs = []
    for new_start, old_start, length in plan.runs:
        if old_start < 0:
            status = "new"
        elif old_start == new_start and not plan.scale:
            status = "copy"
        else:
            status = "gather"
        status_runs.append((new_start, new_start + length, status))
        cuts.update((new_start, new_start + length))
    for region in pp.regions:
        if axis < len(region.box):
            for start, stop in region.box[axis]:
                cuts.update((start, stop))
    points = sorted(cuts)
    segments = []
    for start, stop in zip(points, points[1:]):
        status = next(s for a, b, s in status_runs if a <= start < b) if status_runs else "new"
        if segments and segments[-1][2] == status and segments[-1][1] == start and not _region_cut(pp, axis, start):
            segments[-1] = (segments[-1][0], stop, status)
        else:
            segments.append((start, stop, status))
    return segments


def _region_cut(pp: ParamPlan, axis: int, position: int) -> bool:
    return any(axis < len(r.box) and any(position in (a, b) for a, b in r.box[axis]) for r in pp.regions)


def _block_colour(pp: ParamPlan, segments: tuple[tuple[int, int, str], ...]) -> str:
    """Return the colour key of the block spanned by one segment per leading axis."""
    if all(segment[2] != "new" for segment in segments):
        if pp.folds:
            return "fold"
        return "copy" if all(segment[2] == "copy" for segment in segments) else "gather"
    for region in pp.regions:
        if all(any(a <= segment[0] < b for a, b in region.box[axis]) for axis, segment in enumerate(segments)):
            return region.rule
    return "zero"


def blocks(pp: ParamPlan) -> list[tuple[float, float, float, float, str]]:
    """Return blocks (x, y, width, height, colour key) in unit coordinates [0, 1].

    A 1-D tensor is one row of blocks along its only axis.
    """
    if not pp.shape:
        key = "zero"
        if pp.source:
            key = "copy"
        elif pp.regions:
            key = pp.regions[0].rule
        return [(0.0, 0.0, 1.0, 1.0, key)]
    if len(pp.shape) == 1:
        rows: list[tuple[int, int, str] | None] = [None]
        cols = _segments(pp, 0)
        height_total = 1
    else:
        rows = list(_segments(pp, 0))
        cols = _segments(pp, 1)
        height_total = pp.shape[0]
    width_total = cols[-1][1] if cols else 1
    out = []
    for row in rows:
        for col in cols:
            segments = (col,) if row is None else (row, col)
            y, h = (0, 1) if row is None else (row[0], row[1] - row[0])
            out.append((col[0] / width_total, y / height_total, (col[1] - col[0]) / width_total,
                        h / height_total, _block_colour(pp, segments)))
    return out


def _legend_keys(plan: Plan) -> list[str]:
    used = set()
    for pp in plan.params:
        if pp.tied_to is None:
            used.update(key for *_, key in blocks(pp))
    return [k for k in COLOURS if k in used]


def html_report(plan: Plan, title: str = "Surgery plan") -> str:
    """Return a self-contained HTML page (inline SVG and CSS, no external assets)."""
    summary = summarise_plan(plan)
    width, height = 240, 36
    rows_html = []
    for pp, row in zip(plan.params, summary["params"]):
        if pp.tied_to is not None:
            svg = f'<span class="tied">tied to {html.escape(pp.tied_to)}</span>'
        else:
            rects = []
            for x, y, w, h, key in blocks(pp):
                rects.append(
                    f'<rect x="{x * width:.2f}" y="{y * height:.2f}" width="{max(w * width, 0.8):.2f}" '
                    f'height="{max(h * height, 0.8):.2f}" fill="{COLOURS.get(key, "#000")}"><title>{html.escape(LABELS.get(key, key))}</title></rect>'
                )
            svg = (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
                   f'xmlns="http://www.w3.org/2000/svg">{"".join(rects)}</svg>')
        init = ", ".join(f"{rule}: {n}" for rule, n in row["initialised"].items()) or "&ndash;"
        flag = "" if pp.exact else ' <span class="approx">approximate</span>'
        notes = "<br>".join(html.escape(n) for n in pp.notes)
        rows_html.append(
            f"<tr><td class=name>{html.escape(pp.name)}{flag}<div class=notes>{notes}</div></td>"
            f"<td>{'&times;'.join(str(s) for s in pp.shape) or 'scalar'}</td><td>{svg}</td>"
            f"<td>{html.escape(row['action'])}</td><td class=num>{row['copied']}</td><td class=num>{row['gathered']}</td>"
            f"<td>{init}</td><td class=num>{row['dropped']}</td></tr>"
        )
    legend = "".join(
        f'<span class="key"><span class="swatch" style="background:{COLOURS[k]}"></span>{html.escape(LABELS[k])}</span>'
        for k in _legend_keys(plan)
    )
    dropped = "".join(f"<li>{html.escape(d['name'])} ({'&times;'.join(map(str, d['shape']))}): {html.escape(d['reason'])}</li>"
                      for d in summary["dropped_params"])
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in summary["notes"])
    verdict = ("<span class=exact>exact</span>" if plan.exact
               else f"<span class=approx>approximate, estimated relative error {plan.expected_error:.2g}</span>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 8px; vertical-align: middle; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.name {{ font-family: monospace; }}
.notes {{ font-size: 11px; color: #777; font-family: sans-serif; }}
.approx {{ color: #c0392b; font-weight: bold; }}
.exact {{ color: #3d8b37; font-weight: bold; }}
.key {{ margin-right: 16px; white-space: nowrap; font-size: 13px; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: middle; }}
svg {{ border: 1px solid #999; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Plan {verdict}. {summary['transferred']} of {summary['elements']} elements transferred
({100 * summary['transferred_share']:.2f}%), {summary['dropped_elements']} old elements dropped.
sha256 <code>{summary['sha256']}</code></p>
<p>{legend}</p>
<table><tr><th>parameter</th><th>shape</th><th>blocks (rows: axis 0, columns: axis 1)</th><th>action</th>
<th>copied</th><th>gathered</th><th>initialised (rule)</th><th>dropped</th></tr>
{''.join(rows_html)}</table>
{'<h2>Dropped parameters</h2><ul>' + dropped + '</ul>' if dropped else ''}
{'<h2>Notes</h2><ul>' + notes + '</ul>' if notes else ''}
</body></html>
"""


def png_report(plan: Plan, path: str | Path, title: str = "Surgery plan") -> None:
    """Draw the plan with matplotlib (Agg backend) and save it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    params = [pp for pp in plan.params if pp.tied_to is None]
    summary = summarise_plan(plan)
    rows = {r["name"]: r for r in summary["params"]}
    height = 0.32 * len(params) + 1.6
    figure, axes = plt.subplots(figsize=(11, height))
    for k, pp in enumerate(params):
        top = len(params) - 1 - k
        for x, y, w, h, key in blocks(pp):
            axes.add_patch(Rectangle((x * 3, top + 0.1 + (1 - y - h) * 0.8), w * 3, h * 0.8, color=COLOURS.get(key, "#000"), linewidth=0))
        axes.add_patch(Rectangle((0, top + 0.1), 3, 0.8, fill=False, edgecolor="#666", linewidth=0.5))
        shape = "x".join(str(s) for s in pp.shape) or "scalar"
        mark = "" if pp.exact else "  [approximate]"
        axes.text(-0.1, top + 0.5, f"{pp.name} ({shape})", ha="right", va="center", fontsize=7, family="monospace")
        axes.text(3.1, top + 0.5, rows[pp.name]["action"] + mark, ha="left", va="center", fontsize=7)
    axes.set_xlim(-3.2, 5.2)
    axes.set_ylim(-0.2, len(params) + 0.2)
    axes.axis("off")
    verdict = "exact" if plan.exact else f"approximate (estimated error {plan.expected_error:.2g})"
    axes.set_title(f"{title}: {100 * summary['transferred_share']:.1f}% of elements transferred, {verdict}", fontsize=10)
    handles = [Patch(color=COLOURS[k], label=LABELS[k]) for k in _legend_keys(plan)]
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=7, frameon=False)
    figure.tight_layout()
    figure.savefig(str(path), dpi=110)
    plt.close(figure)
