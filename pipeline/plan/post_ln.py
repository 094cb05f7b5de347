"""Inserted post-LN blocks: where a LayerNorm affine moves so that the block is an identity.

A post-LN block runs sublayers ``h_i = N_i(h_{i-1} + f_i(h_{i-1}))`` for ``i = 1..k``
(a BERT layer has two: attention, then the feed-forward network). With the output
projection of every ``f_i`` at zero, the block computes ``N_k(...N_1(x))``. Its input is
the output ``x = g * n + b`` of a LayerNorm ``P`` with normalised ``n``. The planner sets
P's weight to 1 and bias to 0, so that P returns ``n``, sets every block norm but the last
to weight 1 and bias 0, and gives the last one P's old weight and bias. The block then
returns ``g * N_k(...N_1(n)) + b``, which is ``x`` up to the eps of the norms. A LayerNorm
without weight or bias has nothing to set or move for that tensor, but the last block
norm needs each tensor that P has.

With ``s`` the input of P, ``var`` its variance over the normalised axes and ``e_P``,
``e_k`` the eps of P and of the block's last norm, the block's output differs from ``x``
by a relative ``|e_P / var - e_k| / 2`` to first order. The other norms of the block add
terms of order ``eps**2``.

This module finds the pieces from the call sequence of a forward pass. It cannot see data
flow, so a block whose zero projections are not added to a residual, or a LayerNorm whose
output also feeds modules outside the block, passes these checks and fails verification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import nn

from pipeline.plan.structure import NORM_TYPES

# Modules that return their input unchanged in eval mode; they may sit between P and the block.
PASS_THROUGH_TYPES: tuple[type, ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
)
# Up to this LayerNorm eps the construction counts as exact: the relative error
# eps / (2 * var) stays below float32 rounding (6e-8) whenever the input of P has a
# variance above 1e-2. BERT uses 1e-12; PyTorch's nn.LayerNorm defaults to 1e-5.
EXACT_EPS = 1e-9


class PostLNMismatch(ValueError):
    """An inserted post-LN block where the LayerNorm affine cannot move; the message gives the reason."""


@dataclass(frozen=True)
class PostLNBlock:
    """The modules of an inserted post-LN block that the identity construction sets.

    ``projections[i]`` is the last parameterised layer before ``norms[i]``, in call
    order. ``previous`` is the LayerNorm whose output the block reads. ``eps`` contains
    the eps of ``previous`` followed by those of ``norms``.
    """

    prefix: str
    previous: str
    projections: tuple[str, ...]
    norms: tuple[str, ...]
    eps: tuple[float, ...]

    @property
    def last_norm(self) -> str:
        return self.norms[-1]


def find_post_ln_block(prefix: str, sequence: Sequence[str], modules: Mapping[str, nn.Module]) -> PostLNBlock:
    """Find the projections, norms and preceding LayerNorm of the inserted block ``prefix``.

    ``sequence`` lists the leaf modules of the new model once per call of a forward pass.
    Raises :class:`PostLNMismatch` when the block is not a run of sublayers that each end
    in an ``nn.LayerNorm``, or when no ``nn.LayerNorm``, called once, runs right before
    the block (dropout and ``nn.Identity`` in between are skipped). Whether the block's
    last norm can hold the weight and bias that move is checked by the planner.
    """
    inside = [i for i, name in enumerate(sequence) if name == prefix or name.startswith(prefix + ".")]
    if not inside:
        raise PostLNMismatch(f"{prefix!r} is never called in a forward pass")
    first, last = inside[0], inside[-1]
    calls = list(sequence[first:last + 1])
    if len(calls) != len(inside):
        outside = next(name for name in calls if not (name == prefix or name.startswith(prefix + ".")))
        raise PostLNMismatch(f"the forward pass calls {outside!r} between the modules of {prefix!r}")
    for name in calls:
        if calls.count(name) > 1:
            raise PostLNMismatch(f"{name!r} is called {calls.count(name)} times in one forward pass")

    projections: list[str] = []
    norms: list[str] = []
    candidate: str | None = None
    for name in calls:
        module = modules[name]
        if isinstance(module, NORM_TYPES):
            _check_layer_norm(name, module)
            if candidate is None:
                raise PostLNMismatch(
                    f"the norm {name!r} has no parameterised layer before it inside {prefix!r}, "
                    "so no zero projection can make its sublayer an identity"
                )
            projections.append(candidate)
            norms.append(name)
            candidate = None
        elif any(True for _ in module.parameters(recurse=False)):
            candidate = name
    if not norms:
        raise PostLNMismatch(f"{prefix!r} calls no normalisation layer")
    if candidate is not None:
        raise PostLNMismatch(f"{candidate!r} runs after the last norm {norms[-1]!r} of {prefix!r}")

    previous = _previous_module(sequence, first, modules)
    if previous is None:
        raise PostLNMismatch(f"no module runs before {prefix!r}, so no LayerNorm produces its input")
    module = modules[previous]
    if not isinstance(module, nn.LayerNorm):
        raise PostLNMismatch(
            f"the module that runs before {prefix!r} is {previous!r}, a {type(module).__name__}, not an nn.LayerNorm"
        )
    if sequence.count(previous) > 1:
        raise PostLNMismatch(
            f"the LayerNorm {previous!r} before {prefix!r} is called {sequence.count(previous)} times, "
            "so moving its weight and bias would change its other calls"
        )
    shapes = {tuple(modules[name].normalized_shape) for name in (previous, *norms)}
    if len(shapes) != 1:
        raise PostLNMismatch(
            f"the LayerNorms {[previous, *norms]} normalise different shapes {sorted(shapes)}; "
            "the weight and bias of one cannot move to another"
        )
    eps = tuple(float(modules[name].eps) for name in (previous, *norms))
    return PostLNBlock(prefix, previous, tuple(projections), tuple(norms), eps)


def _previous_module(sequence: Sequence[str], first: int, modules: Mapping[str, nn.Module]) -> str | None:
    """Return the module called right before position ``first``, skipping pass-through modules."""
    position = first - 1
    while position >= 0 and isinstance(modules[sequence[position]], PASS_THROUGH_TYPES):
        position -= 1
    return sequence[position] if position >= 0 else None


def _check_layer_norm(name: str, module: nn.Module) -> None:
    if not isinstance(module, nn.LayerNorm):
        raise PostLNMismatch(
            f"the norm {name!r} is a {type(module).__name__}, not an nn.LayerNorm, so it does not "
            "return a normalised input unchanged"
        )


def affine_tensors(module: nn.Module) -> tuple[str, ...]:
    """Return the local names of the affine tensors a LayerNorm has: weight, bias, both or none."""
    return tuple(local for local in ("weight", "bias") if getattr(module, local, None) is not None)
