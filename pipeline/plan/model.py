"""Surgery plans as pure data: per new parameter, index maps, init regions and folds.

A plan says, for every tensor of the new model's state dict, where each element comes
from. It holds no tensors, so it can be printed, hashed, diffed, stored as JSON and
applied to any tensors shaped like the parameters (weights, Adam moments, shards).

- :class:`AxisPlan` maps each index of one axis of the new tensor to an index of the old
  tensor (``-1`` for a new index), stored as runs. Net2Net widening also scales some
  indices of an axis.
- :class:`InitRegion` is a box (per axis, a list of index ranges) of new elements that
  one named rule fills, with its own seed.
- :class:`Fold` adds ``W[:, j] * c`` of a removed constant input column to a bias.

Elements whose indices are all mapped are copied (same position on every axis) or
gathered (moved, permuted or replicated). Every other element lies in exactly one init
region.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

PLAN_FORMAT = "surgery-plan/1"

Range = tuple[int, int]
Run = tuple[int, int, int]


class PlanError(ValueError):
    """An invalid plan, plan option or plan input. The message names the offending entry."""


def freeze(value: Any) -> Any:
    """Turn JSON lists into tuples, recursively, so that plan values compare and hash."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    return value


def thaw(value: Any) -> Any:
    """Turn tuples back into JSON lists, recursively."""
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def ranges_of(indices: Iterable[int]) -> tuple[Range, ...]:
    """Compress sorted, distinct indices into ``(start, stop)`` ranges."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return tuple((a, b) for a, b in out)


def range_count(ranges: Sequence[Range]) -> int:
    return sum(stop - start for start, stop in ranges)


def range_indices(ranges: Sequence[Range]) -> list[int]:
    return [i for start, stop in ranges for i in range(start, stop)]


@dataclass(frozen=True)
class AxisPlan:
    """Where the indices of one axis of a new tensor come from.

    ``runs`` are ``(new_start, old_start, length)`` in order and cover ``[0, size)``;
    ``old_start`` is -1 for new indices. ``scale`` lists ``(new_start, length, factor)``
    for indices whose gathered values are multiplied by ``factor`` (Net2Net replicas).
    ``role`` is the map's role of this axis and ``blocks`` the number of concatenated
    blocks (4 for the gate rows of an LSTM) that were matched one by one.
    """

    size: int
    runs: tuple[Run, ...]
    role: str = ""
    blocks: int = 1
    scale: tuple[tuple[int, int, float], ...] = ()

    @classmethod
    def from_index(cls, index: Sequence[int], role: str = "", blocks: int = 1,
                   scale: Sequence[float] | None = None) -> "AxisPlan":
        runs: list[list[int]] = []
        for position, old in enumerate(index):
            old = int(old)
            if runs:
                start, old_start, length = runs[-1]
                continues = (old == -1 and old_start == -1) or (old != -1 and old_start != -1 and old == old_start + length)
                if continues:
                    runs[-1][2] += 1
                    continue
            runs.append([position, old, 1])
        scale_runs: list[list[Any]] = []
        for position, factor in enumerate(scale or ()):
            if factor == 1.0:
                continue
            if scale_runs and scale_runs[-1][0] + scale_runs[-1][1] == position and scale_runs[-1][2] == factor:
                scale_runs[-1][1] += 1
            else:
                scale_runs.append([position, 1, float(factor)])
        return cls(len(index), tuple(tuple(r) for r in runs), role, blocks, tuple(tuple(s) for s in scale_runs))

    @classmethod
    def new(cls, size: int, role: str = "") -> "AxisPlan":
        return cls(size, ((0, -1, size),) if size else (), role)

    def index(self) -> list[int]:
        """Return the old index of every new index, -1 for new ones."""
        out: list[int] = []
        for _, old_start, length in self.runs:
            out.extend([-1] * length if old_start < 0 else range(old_start, old_start + length))
        return out

    def mapped(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the new positions that have a source and their old positions (int64)."""
        new_parts, old_parts = [], []
        for new_start, old_start, length in self.runs:
            if old_start >= 0:
                new_parts.append(torch.arange(new_start, new_start + length))
                old_parts.append(torch.arange(old_start, old_start + length))
        if not new_parts:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty
        return torch.cat(new_parts), torch.cat(old_parts)

    def scale_vector(self) -> torch.Tensor | None:
        """Return the factor of every new index, or None when no index is scaled."""
        if not self.scale:
            return None
        out = torch.ones(self.size, dtype=torch.float64)
        for start, length, factor in self.scale:
            out[start:start + length] = factor
        return out

    def mapped_count(self) -> int:
        return sum(length for _, old_start, length in self.runs if old_start >= 0)

    def identity_count(self) -> int:
        """Count new indices that take the old index at the same position."""
        return sum(length for new_start, old_start, length in self.runs if old_start == new_start)

    def new_ranges(self) -> tuple[Range, ...]:
        return tuple((s, s + n) for s, o, n in self.runs if o < 0)

    def mapped_ranges(self) -> tuple[Range, ...]:
        return ranges_of(i for s, o, n in self.runs if o >= 0 for i in range(s, s + n))

    def old_indices_used(self) -> set[int]:
        return {o + k for _, o, n in self.runs if o >= 0 for k in range(n)}

    def is_identity(self, old_size: int) -> bool:
        return old_size == self.size and self.runs == ((0, 0, self.size),) and not self.scale

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size, "runs": [list(r) for r in self.runs], "role": self.role}
        if self.blocks != 1:
            out["blocks"] = self.blocks
        if self.scale:
            out["scale"] = [list(s) for s in self.scale]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AxisPlan":
        return cls(
            int(data["size"]),
            tuple(tuple(int(v) for v in r) for r in data["runs"]),
            str(data.get("role", "")),
            int(data.get("blocks", 1)),
            tuple((int(s), int(n), float(f)) for s, n, f in data.get("scale", ())),
        )


@dataclass(frozen=True)
class InitRegion:
    """A box of new elements filled by one rule.

    ``box`` holds, per axis, sorted disjoint ``(start, stop)`` ranges of new indices; the
    region is their Cartesian product. ``situation`` says why the elements are new
    (``new_input``, ``new_unit`` ...), ``rule`` and ``params`` how they are filled, and
    ``exact`` whether the rule keeps the old function in that situation.
    """

    box: tuple[tuple[Range, ...], ...]
    rule: str
    params: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    situation: str = ""
    exact: bool = True

    def count(self) -> int:
        total = 1
        for ranges in self.box:
            total *= range_count(ranges)
        return total

    def param(self, key: str, default: Any = None) -> Any:
        for name, value in self.params:
            if name == key:
                return value
        return default

    def to_json(self) -> dict[str, Any]:
        return {
            "box": [[list(r) for r in ranges] for ranges in self.box],
            "rule": self.rule,
            "params": {k: thaw(v) for k, v in self.params},
            "seed": self.seed,
            "situation": self.situation,
            "exact": self.exact,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "InitRegion":
        return cls(
            tuple(tuple((int(a), int(b)) for a, b in ranges) for ranges in data["box"]),
            str(data["rule"]),
            freeze(data.get("params", {})),
            int(data.get("seed", 0)),
            str(data.get("situation", "")),
            bool(data.get("exact", True)),
        )


@dataclass(frozen=True)
class Fold:
    """Add the removed columns of an old weight, times their constants, to a bias.

    For old weight ``W`` the bias gains ``sum_j W[..., j, ...] * constants[j]`` over
    ``columns`` of ``in_axis``, indexed along ``out_axis``, which follows the bias's axis 0.
    """

    weight: str
    in_axis: int
    out_axis: int
    columns: tuple[int, ...]
    constants: tuple[float, ...]
    atoms: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "in_axis": self.in_axis,
            "out_axis": self.out_axis,
            "columns": list(self.columns),
            "constants": list(self.constants),
            "atoms": list(self.atoms),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Fold":
        return cls(
            str(data["weight"]),
            int(data["in_axis"]),
            int(data["out_axis"]),
            tuple(int(c) for c in data["columns"]),
            tuple(float(c) for c in data["constants"]),
            tuple(str(a) for a in data.get("atoms", ())),
        )


@dataclass(frozen=True)
class ParamPlan:
    """How to build one tensor of the new state dict."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    kind: str = "parameter"
    source: str | None = None
    source_shape: tuple[int, ...] = ()
    axes: tuple[AxisPlan, ...] = ()
    regions: tuple[InitRegion, ...] = ()
    folds: tuple[Fold, ...] = ()
    notes: tuple[str, ...] = ()
    tied_to: str | None = None
    exact: bool = True

    def numel(self) -> int:
        total = 1
        for size in self.shape:
            total *= size
        return total

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "kind": self.kind}
        if self.tied_to is not None:
            out["tied_to"] = self.tied_to
            return out
        out.update(
            {
                "source": self.source,
                "source_shape": list(self.source_shape),
                "axes": [a.to_json() for a in self.axes],
                "regions": [r.to_json() for r in self.regions],
                "folds": [f.to_json() for f in self.folds],
                "notes": list(self.notes),
                "exact": self.exact,
            }
        )
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ParamPlan":
        return cls(
            name=str(data["name"]),
            shape=tuple(int(s) for s in data["shape"]),
            dtype=str(data.get("dtype", "float32")),
            kind=str(data.get("kind", "parameter")),
            source=data.get("source"),
            source_shape=tuple(int(s) for s in data.get("source_shape", ())),
            axes=tuple(AxisPlan.from_json(a) for a in data.get("axes", ())),
            regions=tuple(InitRegion.from_json(r) for r in data.get("regions", ())),
            folds=tuple(Fold.from_json(f) for f in data.get("folds", ())),
            notes=tuple(str(n) for n in data.get("notes", ())),
            tied_to=data.get("tied_to"),
            exact=bool(data.get("exact", True)),
        )


@dataclass(frozen=True)
class DroppedParam:
    """An old tensor with no destination in the new model."""

    name: str
    shape: tuple[int, ...]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DroppedParam":
        return cls(str(data["name"]), tuple(int(s) for s in data["shape"]), str(data["reason"]))


@dataclass(frozen=True)
class Plan:
    """A whole surgery plan from an old model to a new one.

    ``old_model`` and ``new_model`` are the model specs as canonical JSON text (empty when
    the plan was built from modules without specs). ``renames`` (old atom to new atom) and
    ``constants`` (removed field to the value fed to the old model) are what verification
    needs to build matching probe inputs. ``expected_error`` is an order-of-magnitude
    estimate of the relative output error of an approximate plan, 0 for an exact one.
    """

    params: tuple[ParamPlan, ...]
    dropped: tuple[DroppedParam, ...] = ()
    seed: int = 0
    old_model: str = ""
    new_model: str = ""
    renames: tuple[tuple[str, str], ...] = ()
    constants: tuple[tuple[str, float], ...] = ()
    notes: tuple[str, ...] = ()
    exact: bool = True
    expected_error: float = 0.0
    options: str = "{}"

    def param(self, name: str) -> ParamPlan:
        for pp in self.params:
            if pp.name == name:
                return pp
        raise PlanError(f"parameter {name!r} not found in the plan; it has {[p.name for p in self.params][:20]}")

    def names(self) -> list[str]:
        return [pp.name for pp in self.params]

    # JSON and hash ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "seed": self.seed,
            "old_model": json.loads(self.old_model) if self.old_model else None,
            "new_model": json.loads(self.new_model) if self.new_model else None,
            "options": json.loads(self.options),
            "renames": {old: new for old, new in self.renames},
            "constants": {atom: value for atom, value in self.constants},
            "exact": self.exact,
            "expected_error": self.expected_error,
            "notes": list(self.notes),
            "params": [pp.to_json() for pp in self.params],
            "dropped": [d.to_json() for d in self.dropped],
        }

    def canonical_json(self) -> str:
        return canonical_json(self.to_json())

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, data: Any) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise PlanError(f"not a surgery plan: format is {found!r}, expected {PLAN_FORMAT!r}")
        try:
            return cls(
                params=tuple(ParamPlan.from_json(p) for p in data["params"]),
                dropped=tuple(DroppedParam.from_json(d) for d in data.get("dropped", ())),
                seed=int(data.get("seed", 0)),
                old_model=canonical_json(data["old_model"]) if data.get("old_model") else "",
                new_model=canonical_json(data["new_model"]) if data.get("new_model") else "",
                renames=tuple((str(k), str(v)) for k, v in data.get("renames", {}).items()),
                constants=tuple((str(k), float(v)) for k, v in data.get("constants", {}).items()),
                notes=tuple(str(n) for n in data.get("notes", ())),
                exact=bool(data.get("exact", True)),
                expected_error=float(data.get("expected_error", 0.0)),
                options=canonical_json(data.get("options", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"invalid surgery plan JSON: {e!r}") from e

    @classmethod
    def loads(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"a surgery plan must be JSON: {e}") from e
        return cls.from_json(data)


def canonical_json(data: Any) -> str:
    """Serialise with sorted keys and no whitespace; the form that plan hashes cover."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def diff_plans(left: Plan, right: Plan) -> list[str]:
    """List the differences between two plans, one line per changed entry."""
    lines: list[str] = []
    left_json, right_json = left.to_json(), right.to_json()
    for key in sorted(set(left_json) | set(right_json)):
        if key in ("params", "dropped"):
            continue
        if left_json.get(key) != right_json.get(key):
            lines.append(f"{key}: {left_json.get(key)!r} -> {right_json.get(key)!r}")
    left_params = {p["name"]: p for p in left_json["params"]}
    right_params = {p["name"]: p for p in right_json["params"]}
    for name in sorted(set(left_params) | set(right_params)):
        a, b = left_params.get(name), right_params.get(name)
        if a is None:
            lines.append(f"{name}: only in the right plan")
        elif b is None:
            lines.append(f"{name}: only in the left plan")
        elif a != b:
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            lines.append(f"{name}: {', '.join(changed)} differ")
    left_dropped = {d["name"] for d in left_json["dropped"]}
    right_dropped = {d["name"] for d in right_json["dropped"]}
    for name in sorted(left_dropped ^ right_dropped):
        side = "left" if name in left_dropped else "right"
        lines.append(f"dropped {name}: only in the {side} plan")
    return lines


@dataclass(frozen=True)
class Counts:
    """Element counts of one parameter plan."""

    total: int
    copied: int
    gathered: int
    initialised: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    folded: int = 0
    dropped: int = 0

    def init_total(self) -> int:
        return sum(n for _, n in self.initialised)


def count_elements(pp: ParamPlan) -> Counts:
    """Count copied, gathered, initialised (by rule), folded and dropped elements.

    Counts come from per-axis index maps and region boxes, so no per-element tensor is
    built. ``dropped`` counts old elements that no new element reads; ``folded`` counts
    the elements of this bias that receive folded constant columns.
    """
    total = pp.numel()
    if pp.tied_to is not None:
        return Counts(total, 0, 0)
    mapped = 1
    identity = 1
    for axis in pp.axes:
        mapped *= axis.mapped_count()
        identity *= axis.identity_count()
    if not pp.axes:
        mapped = identity = 1 if pp.source is not None else 0
    scaled = any(a.scale for a in pp.axes)
    copied = 0 if scaled else identity
    by_rule: dict[str, int] = {}
    for region in pp.regions:
        by_rule[region.rule] = by_rule.get(region.rule, 0) + region.count()
    folded = pp.axes[0].mapped_count() if pp.folds and pp.axes else 0
    dropped = 0
    if pp.source is not None:
        used = 1
        source_total = 1
        for axis, old_size in zip(pp.axes, pp.source_shape):
            used *= len(axis.old_indices_used())
            source_total *= old_size
        dropped = source_total - used if pp.axes else 0
    return Counts(total, copied, mapped - copied, tuple(sorted(by_rule.items())), folded, dropped)
