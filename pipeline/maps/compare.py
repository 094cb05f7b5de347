"""Element-by-element comparison of two interaction maps of the same model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.maps.interaction import InteractionMap


@dataclass(frozen=True)
class MapDifference:
    """One parameter whose maps differ, with a count and the first differing element."""

    param: str
    side: str
    elements: int
    index: tuple[int, ...] | None
    left: list[str]
    right: list[str]

    def __str__(self) -> str:
        if self.index is None:
            return f"{self.param}: {self.left[0]}"
        return (
            f"{self.param} [{self.side}]: {self.elements} elements differ; first at "
            f"{list(self.index)}: {sorted(self.left)} vs {sorted(self.right)}"
        )


def diff_maps(left: InteractionMap, right: InteractionMap) -> list[MapDifference]:
    """Return every parameter whose input or output sets differ between two maps.

    Atoms are matched by name, so the two maps may order their atoms differently.
    """
    differences: list[MapDifference] = []
    left_names = set(left.param_names())
    right_names = set(right.param_names())
    for name in sorted(left_names ^ right_names):
        where = "left" if name in left_names else "right"
        differences.append(MapDifference(name, "params", 0, None, [f"only in the {where} map"], []))

    translate = _translation(right, left)
    for name in sorted(left_names & right_names):
        lparam = left.params[left.tied.get(name, name)]
        rparam = right.params[right.tied.get(name, name)]
        if lparam.shape != rparam.shape:
            differences.append(
                MapDifference(name, "shape", 0, None, [f"shape {list(lparam.shape)} vs {list(rparam.shape)}"], [])
            )
            continue
        for side in ("inputs", "outputs"):
            found = _diff_ids(left, right, translate, name, side, getattr(lparam, side), getattr(rparam, side), lparam.shape)
            if found is not None:
                differences.append(found)
    return differences


def _translation(source: InteractionMap, target: InteractionMap) -> dict[int, int]:
    """Map each atom index of ``source`` to the same-named atom's index in ``target``, or -1."""
    index = target.atom_index()
    return {i: index.get(atom, -1) for i, atom in enumerate(source.atoms)}


def _canonical(imap: InteractionMap, set_id: int, translate: dict[int, int] | None) -> frozenset:
    members = imap.table.members(set_id)
    if translate is None:
        return frozenset(members)
    return frozenset(translate[m] if translate[m] >= 0 else ("missing", str(imap.atoms[m])) for m in members)


def _diff_ids(left, right, translate, name, side, lids, rids, shape) -> MapDifference | None:
    common = tuple(max(a, b) for a, b in zip(lids.shape, rids.shape))
    lfull = lids.expand(common).reshape(-1)
    rfull = rids.expand(common).reshape(-1)
    pairs, inverse = torch.unique(torch.stack([lfull, rfull], 1), dim=0, return_inverse=True)
    bad = torch.zeros(pairs.shape[0], dtype=torch.bool)
    for k, (a, b) in enumerate(pairs.tolist()):
        bad[k] = _canonical(left, a, None) != _canonical(right, b, translate)
    if not bool(bad.any()):
        return None
    mismatched = bad[inverse]
    multiplicity = 1
    for full_size, size in zip(shape, common):
        multiplicity *= full_size // size
    first = int(mismatched.nonzero()[0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), common))
    a, b = int(lfull[first]), int(rfull[first])
    return MapDifference(
        name,
        side,
        int(mismatched.sum()) * multiplicity,
        index,
        [str(x) for x in left.atoms_of(a)],
        [str(x) for x in right.atoms_of(b)],
    )
