"""Interned atom sets and set-valued tensors.

Memory is the constraint here: a Five-scale policy has about 1.6e8 parameter elements and
a few thousand atoms, so one bit per (element, atom) pair would already need 20 GB. Two
choices keep it small.

1. Interning. Each distinct set of atoms is stored once in a :class:`SetTable`, as a Python
   int used as a bitset (bit ``i`` is atom ``i``). Tensors hold int64 set ids. A model has
   few distinct sets (hundreds), because sets only change where features meet.
2. Per-axis factorisation. A set tensor is stored in *reduced* form: any axis along which
   all ids are equal has size 1 and broadcasts. The input map of a ``[4096, 16384]``
   weight whose columns see the same set along every row is a ``[1, 16384]`` tensor.

So memory grows with the number of distinct sets plus the number of elements along the
axes where sets actually vary, never as parameters x atoms.
"""

from __future__ import annotations

import torch

EMPTY = 0


class SetTable:
    """An intern table of atom sets. Id 0 is the empty set."""

    def __init__(self) -> None:
        self._bits: list[int] = [0]
        self._ids: dict[int, int] = {0: 0}
        self._union_cache: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self._bits)

    def intern(self, bits: int) -> int:
        found = self._ids.get(bits)
        if found is None:
            found = len(self._bits)
            self._bits.append(bits)
            self._ids[bits] = found
        return found

    def intern_atoms(self, atom_indices: list[int] | range) -> int:
        bits = 0
        for index in atom_indices:
            bits |= 1 << index
        return self.intern(bits)

    def bits(self, set_id: int) -> int:
        return self._bits[set_id]

    def members(self, set_id: int) -> list[int]:
        bits = self._bits[set_id]
        out = []
        while bits:
            low = bits & -bits
            out.append(low.bit_length() - 1)
            bits ^= low
        return out

    def union_id(self, a: int, b: int) -> int:
        if a == b or b == EMPTY:
            return a
        if a == EMPTY:
            return b
        key = (a, b) if a < b else (b, a)
        found = self._union_cache.get(key)
        if found is None:
            found = self.intern(self._bits[a] | self._bits[b])
            self._union_cache[key] = found
        return found

    def union_many(self, ids: list[int]) -> int:
        result = EMPTY
        for set_id in ids:
            result = self.union_id(result, set_id)
        return result

    # Tensor operations ------------------------------------------------------------------

    def union(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Union two id tensors element by element, with broadcasting, in reduced form."""
        if a.numel() == 1 and b.numel() == 1:
            shape = torch.broadcast_shapes(a.shape, b.shape)
            return torch.tensor(self.union_id(int(a.reshape(())), int(b.reshape(())))).reshape(shape)
        if not bool(b.any()):
            return _broadcast_reduced(a, b)
        if not bool(a.any()):
            return _broadcast_reduced(b, a)
        shape = torch.broadcast_shapes(a.shape, b.shape)
        left = a.expand(shape).reshape(-1)
        right = b.expand(shape).reshape(-1)
        merged = self._union_pairs(left, right)
        return compress(merged.reshape(shape))

    def _union_pairs(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Union two flat id tensors element by element, computing each distinct pair once."""
        width = len(self._bits) + 1
        keys = left * width + right
        unique, inverse = torch.unique(keys, return_inverse=True)
        merged = torch.tensor(
            [self.union_id(k // width, k % width) for k in unique.tolist()], dtype=torch.int64
        )
        return merged[inverse]

    def union_reduce(self, ids: torch.Tensor, dims: int | tuple[int, ...], keepdim: bool = True) -> torch.Tensor:
        """Union ids over ``dims``: each output element is the union along those axes."""
        if isinstance(dims, int):
            dims = (dims,)
        dims = tuple(sorted(d % ids.dim() for d in dims)) if ids.dim() else ()
        varying = [d for d in dims if ids.shape[d] > 1]
        if varying:
            kept = [d for d in range(ids.dim()) if d not in varying]
            moved = ids.permute(*kept, *varying)
            kept_shape = [ids.shape[d] for d in kept]
            rows = moved.reshape(-1, _prod(ids.shape[d] for d in varying))
            ids = self._union_rows(rows).reshape(kept_shape)
            for d in varying:
                ids = ids.unsqueeze(d)
        if not keepdim:
            for d in reversed(dims):
                ids = ids.squeeze(d)
        return ids

    def _union_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] == 0:
            return torch.zeros(0, dtype=torch.int64)
        first = rows[:, :1]
        if bool((rows == first).all()):
            return first.reshape(-1).clone()
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        folded = []
        for row in unique.tolist():
            folded.append(self.union_many(sorted(set(row))))
        return torch.tensor(folded, dtype=torch.int64)[inverse]

    def scatter_union(self, target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Union ``values[i]`` into ``target[index[i]]`` for flat 1-D tensors; repeats allowed."""
        keep = values != EMPTY
        if not bool(keep.any()):
            return target
        width = len(self._bits) + 1
        keys = torch.unique(index[keep] * width + values[keep])
        positions, ids = keys // width, keys % width
        out = target.clone()
        # Keys are sorted by position, so each round takes the next distinct value of every
        # position; rounds = the most distinct values that reach one position.
        while positions.numel():
            first = torch.ones_like(positions, dtype=torch.bool)
            first[1:] = positions[1:] != positions[:-1]
            chosen = positions[first]
            out[chosen] = self._union_pairs(out[chosen], ids[first])
            positions, ids = positions[~first], ids[~first]
        return out

    def atoms_in(self, set_id: int, mask: int) -> int:
        """Return the id of ``set_id`` restricted to the atoms in bitmask ``mask``."""
        return self.intern(self._bits[set_id] & mask)


def compress(ids: torch.Tensor) -> torch.Tensor:
    """Reduce every axis along which all ids are equal to size 1."""
    for d in range(ids.dim()):
        if ids.shape[d] > 1:
            first = ids.narrow(d, 0, 1)
            if bool((ids == first).all()):
                ids = first
    return ids


def full(ids: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Materialise a reduced id tensor at its full shape."""
    return ids.expand(shape).contiguous()


def constant(set_id: int, ndim: int) -> torch.Tensor:
    return torch.full((1,) * ndim, set_id, dtype=torch.int64)


def _broadcast_reduced(kept: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Return ``kept`` with the rank of ``kept op other``; its size-1 axes still broadcast."""
    ndim = max(kept.dim(), other.dim())
    while kept.dim() < ndim:
        kept = kept.unsqueeze(0)
    return kept


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out
