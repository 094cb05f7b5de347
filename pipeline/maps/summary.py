"""Per-parameter summaries of an interaction map, as ``surgery map`` prints them."""

from __future__ import annotations

from typing import Any

from pipeline.maps.interaction import InteractionMap


def summarise(imap: InteractionMap) -> dict[str, Any]:
    """Count, per parameter, the elements that carry one, several or all input atoms."""
    n_input_atoms = sum(1 for a in imap.atoms if a.kind != "output")
    input_mask = sum(1 << i for i, a in enumerate(imap.atoms) if a.kind != "output")
    rows = []
    for name in imap.param_names():
        param = imap.params[imap.tied.get(name, name)]
        counts = {"none": 0, "one": 0, "several": 0, "all": 0}
        multiplicity = 1
        for full_size, size in zip(param.shape, param.inputs.shape):
            multiplicity *= full_size // size
        ids, frequency = param.inputs.reshape(-1).unique(return_counts=True)
        sources: set[str] = set()
        for set_id, count in zip(ids.tolist(), frequency.tolist()):
            members = imap.table.members(set_id)
            size = len(members)
            key = "none" if size == 0 else "one" if size == 1 else "several"
            if size and size == n_input_atoms and imap.table.bits(set_id) & input_mask == input_mask:
                key = "all"
            counts[key] += count * multiplicity
            sources.update(_source(imap.atoms[m]) for m in members)
        outputs: set[str] = set()
        for set_id in param.outputs.reshape(-1).unique().tolist():
            outputs.update(imap.atoms[m].source for m in imap.table.members(set_id))
        rows.append(
            {
                "name": name,
                "shape": list(param.shape),
                "elements": _numel(param.shape),
                **counts,
                "inputs": sorted(sources),
                "outputs": sorted(outputs),
                "tied_to": imap.tied.get(name),
            }
        )
    return {"method": imap.method, "atoms": len(imap.atoms), "sets": len(imap.table), "params": rows}


def format_table(summary: dict[str, Any]) -> str:
    header = f"{'parameter':<44} {'shape':<16} {'one':>10} {'several':>10} {'all':>10} {'none':>8}  inputs -> outputs"
    lines = [header, "-" * len(header)]
    for row in summary["params"]:
        shape = "x".join(str(s) for s in row["shape"]) or "scalar"
        inputs = ",".join(row["inputs"]) or "-"
        outputs = ",".join(row["outputs"]) or "-"
        tied = f" (tied to {row['tied_to']})" if row["tied_to"] else ""
        lines.append(
            f"{row['name']:<44} {shape:<16} {row['one']:>10} {row['several']:>10} "
            f"{row['all']:>10} {row['none']:>8}  {inputs} -> {outputs}{tied}"
        )
    lines.append(f"{summary['atoms']} atoms, {summary['sets']} distinct sets, method {summary['method']}")
    return "\n".join(lines)


def _source(atom) -> str:
    return atom.source if atom.kind == "field" else f"{atom.source}(vocabulary)"


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
