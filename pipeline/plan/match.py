"""Axis matching: pair the indices of one axis of a new parameter with the old ones.

The signature of index ``i`` along axis ``a`` is the pair (union of input atoms, union
of output atoms) over every element with index ``i`` on that axis. Old atoms are first
renamed, then both sides are projected onto the atoms that the two models share, so an
atom only one model has never blocks a match:

- an index whose non-empty input signature has only new atoms reads a new feature (or
  is a row of a new category); one with only new output atoms feeds a new output field;
- old indices with only removed atoms are dropped (and folded when declared constant);
- the remaining indices are grouped by projected signature. A signature that one index
  carries on each side matches directly, which yields shifts, permutations and renames.
  Larger groups (hidden units, which carry every upstream atom) match by position in
  order; extra new indices are new units (a wider layer), extra old ones are dropped.

Blocks (LSTM gates, q/k/v rows) are matched one by one. Maps are reduced tensors, so a
signature is computed once per distinct set id, never per element.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.maps.interaction import InteractionMap, ParamMap
from pipeline.plan.model import PlanError

# Kinds of index that have no counterpart on the other side.
FEATURE = "feature"
CATEGORY = "category"
OUTPUT = "output"
HEAD = "head"
UNIT = "unit"


@dataclass(frozen=True)
class Signature:
    """Raw and projected input and output atoms of one index; atoms are canonical texts."""

    raw_in: frozenset
    proj_in: frozenset
    raw_out: frozenset
    proj_out: frozenset


class SignatureTable:
    """Translates set ids of one map into signatures, with renames and projection applied.

    ``translate`` maps an atom index of ``imap`` to the atom's text in the new model's
    naming (renamed for the old map). ``shared`` holds the texts that both models have.
    """

    def __init__(self, imap: InteractionMap, translate: list[str], shared: set[str]) -> None:
        self.imap = imap
        self.translate = translate
        self.shared = shared
        self._sets: dict[int, tuple[frozenset, frozenset]] = {}

    def atoms(self, set_id: int) -> tuple[frozenset, frozenset]:
        found = self._sets.get(set_id)
        if found is None:
            raw = frozenset(self.translate[i] for i in self.imap.table.members(set_id))
            found = (raw, raw & self.shared)
            self._sets[set_id] = found
        return found

    def axis(self, pmap: ParamMap, axis: int) -> list[Signature]:
        """Return the signature of every index along ``axis`` of one parameter."""
        size = pmap.shape[axis]
        ins = _axis_ids(self.imap, pmap.inputs, axis, len(pmap.shape))
        outs = _axis_ids(self.imap, pmap.outputs, axis, len(pmap.shape))
        cache: dict[tuple[int, int], Signature] = {}
        out = []
        for i in range(size):
            key = (ins[i if len(ins) > 1 else 0], outs[i if len(outs) > 1 else 0])
            sig = cache.get(key)
            if sig is None:
                raw_in, proj_in = self.atoms(key[0])
                raw_out, proj_out = self.atoms(key[1])
                sig = Signature(raw_in, proj_in, raw_out, proj_out)
                cache[key] = sig
            out.append(sig)
        return out

    def whole(self, pmap: ParamMap) -> Signature:
        """Return the signature of a whole parameter (union over every element)."""
        dims = tuple(range(len(pmap.shape)))
        table = self.imap.table
        in_id = int(table.union_reduce(pmap.inputs, dims).reshape(-1)[0]) if pmap.inputs.numel() else 0
        out_id = int(table.union_reduce(pmap.outputs, dims).reshape(-1)[0]) if pmap.outputs.numel() else 0
        raw_in, proj_in = self.atoms(in_id)
        raw_out, proj_out = self.atoms(out_id)
        return Signature(raw_in, proj_in, raw_out, proj_out)


def _axis_ids(imap: InteractionMap, ids: torch.Tensor, axis: int, ndim: int) -> list[int]:
    while ids.dim() < ndim:
        ids = ids.unsqueeze(0)
    others = tuple(d for d in range(ndim) if d != axis)
    reduced = imap.table.union_reduce(ids, others, keepdim=False) if others else ids
    return reduced.reshape(-1).tolist()


def classify(sig: Signature, role: str, old_outputs: set[str]) -> str | None:
    """Return the kind of an index that cannot match (feature, category, output, head),
    or None for an index that matches by signature.

    On an axis with an ``in`` role the input side decides first, because that axis
    consumes activations; on other axes the output side decides first.
    """
    new_in = bool(sig.raw_in) and not sig.proj_in
    new_out = bool(sig.raw_out) and not sig.proj_out
    if new_in and ("in" in role or not new_out):
        kinds = {atom.partition(":")[0] for atom in sig.raw_in}
        return CATEGORY if kinds == {"category"} else FEATURE
    if new_out:
        names = {atom.partition(":")[2].partition("/")[0] for atom in sig.raw_out}
        return OUTPUT if names & old_outputs else HEAD
    return None


@dataclass
class AxisMatch:
    """The result of matching one axis.

    ``index[i]`` is the old index of new index ``i`` or -1. ``kinds[i]`` is None for a
    matched index, else the kind of new index. ``dropped`` lists (old index, kind) of
    old indices that nothing reads, where kind is feature, category, output or unit.
    ``positional`` counts new indices matched by position inside a shared signature.
    """

    index: list[int]
    kinds: list[str | None]
    dropped: list[tuple[int, str]] = field(default_factory=list)
    positional: int = 0
    groups: int = 0
    replicas: dict[int, int] = field(default_factory=dict)


def match_axis(old: list[Signature], new: list[Signature], blocks: int, role: str,
               old_outputs: set[str], new_outputs_of_old: set[str], name: str, axis: int,
               replicate: bool = False) -> AxisMatch:
    """Match the indices of one axis, block by block.

    ``old_outputs`` are the new-model names of outputs that the old model had (to tell a
    new field of an existing output from a new head); ``new_outputs_of_old`` is the same
    set seen from the old side, to classify removed output rows. With ``replicate`` the
    extra new indices of a group copy old indices round robin (Net2Net) instead of being
    new; ``replicas`` then maps each new index to its old source.
    """
    if len(old) % blocks or len(new) % blocks:
        raise PlanError(
            f"parameter {name!r} axis {axis}: sizes {len(old)} (old) and {len(new)} (new) are not "
            f"multiples of its {blocks} blocks; set 'blocks' for this parameter in the options"
        )
    old_step, new_step = len(old) // blocks, len(new) // blocks
    result = AxisMatch([-1] * len(new), [None] * len(new))
    for block in range(blocks):
        _match_block(old, new, range(block * old_step, (block + 1) * old_step),
                     range(block * new_step, (block + 1) * new_step), role, old_outputs,
                     new_outputs_of_old, replicate, result)
    return result


def _match_block(old, new, old_range, new_range, role, old_outputs, new_outputs_of_old, replicate, result: AxisMatch) -> None:
    old_groups: dict[tuple, list[int]] = {}
    for i in old_range:
        kind = classify(old[i], role, new_outputs_of_old)
        if kind is not None:
            result.dropped.append((i, kind))
            continue
        old_groups.setdefault((old[i].proj_in, old[i].proj_out), []).append(i)

    new_groups: dict[tuple, list[int]] = {}
    for i in new_range:
        kind = classify(new[i], role, old_outputs)
        if kind is not None:
            result.kinds[i] = kind
            continue
        new_groups.setdefault((new[i].proj_in, new[i].proj_out), []).append(i)

    for key, new_indices in new_groups.items():
        old_indices = old_groups.pop(key, [])
        if len(new_indices) > 1 or len(old_indices) > 1:
            result.positional += min(len(new_indices), len(old_indices))
            result.groups += 1
        for k, i in enumerate(new_indices):
            if k < len(old_indices):
                result.index[i] = old_indices[k]
            elif replicate and old_indices:
                source = old_indices[(k - len(old_indices)) % len(old_indices)]
                result.index[i] = source
                result.replicas[i] = source
            else:
                result.kinds[i] = UNIT
        for i in old_indices[len(new_indices):]:
            result.dropped.append((i, UNIT))
    for old_indices in old_groups.values():
        for i in old_indices:
            result.dropped.append((i, UNIT))
