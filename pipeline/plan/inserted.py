"""Planning tensors without a source: new heads, new branches and inserted modules.

:class:`InsertedPlanning` is a part of the planner in :mod:`pipeline.plan.build`; its
methods use the planner's models, options, name matches and ``_whole`` and ``_issue``.

An inserted module is planned by its mode (option ``inserted``, default ``auto``):

- ``identity``: a square ``nn.Linear`` with weight I and bias 0 (Net2Net);
- ``residual``: the last parameterised layer of the block is zero, so ``x + f(x) = x``;
- a post-LN residual block (a norm runs after that layer) becomes an identity by moving
  the weight and bias of the LayerNorm before it into the block's last norm, see
  :mod:`pipeline.plan.post_ln`;
- ``default``: the modules' default init, which is approximate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from torch import nn

from pipeline.plan.model import AxisPlan, ParamPlan, PlanError
from pipeline.plan.options import RuleChoice
from pipeline.plan.post_ln import EXACT_EPS, PostLNBlock, PostLNMismatch, affine_tensors, find_post_ln_block
from pipeline.plan.structure import ACTIVATION_TYPES, NORM_TYPES

ONES = ("ones", ())
ZERO = ("zero", ())


@dataclass
class MovedAffine:
    """The weight and bias of an old LayerNorm that the last norm of an inserted post-LN block takes.

    ``origin`` is the old LayerNorm module whose ``tensors`` (weight, bias, or both) are
    copied, or None when the LayerNorm before the block has neither. ``resets_previous``
    is true when the LayerNorm before the block is an old one, whose weight becomes 1 and
    bias 0. ``handed_on`` is true when a later inserted block, called right after this
    one, takes the tensors from this block's last norm instead. ``eps`` contains the eps
    of the LayerNorm that ``origin`` names, or of the one before the block, and of every
    LayerNorm between it and the block's output.
    """

    block: PostLNBlock
    origin: str | None
    tensors: tuple[str, ...]
    resets_previous: bool
    eps: tuple[float, ...]
    handed_on: bool = False


class InsertedPlanning:
    """Planner methods for tensors that no old tensor feeds."""

    post_ln_mismatch: dict[str, str]

    def _classify_unsourced(self, names: list[str]) -> tuple[list[tuple[str, str, str]], dict[str, list[str]]]:
        """Split unsourced tensors into whole-tensor situations and inserted modules.

        Returns ``[(name, situation, note)]`` and ``{module prefix: names}``.
        """
        whole: list[tuple[str, str, str]] = []
        inserted: dict[str, list[str]] = {}
        for name in names:
            sig = self.new_table.whole(self.new.imap.params[name])
            if sig.raw_in and not sig.proj_in:
                whole.append((name, "new_unit", "reads only new inputs, whose consumers get zero weights"))
            elif sig.raw_out and not sig.proj_out:
                whole.append((name, "new_head", "feeds only outputs that the old model does not have"))
            elif not sig.raw_in and not sig.raw_out:
                whole.append((name, "new_unit", "touches no input and no output"))
            else:
                inserted.setdefault(self._inserted_prefix(name), []).append(name)
        return whole, inserted

    def _plan_unsourced(self, whole, inserted: dict[str, list[str]], moved: dict[str, MovedAffine]) -> dict[str, ParamPlan]:
        plans: dict[str, ParamPlan] = {}
        for name, situation, note in whole:
            plans[name] = self._whole(name, situation, self.options.rule_for(situation, name), note)
        for prefix, members in inserted.items():
            if prefix in moved:
                plans.update(self._plan_post_ln(moved[prefix], members))
            else:
                plans.update(self._plan_inserted(prefix, members))
        return plans

    def _inserted_prefix(self, name: str) -> str:
        parts = name.split(".")
        sourced = list(self.sources)
        for k in range(1, len(parts)):
            prefix = ".".join(parts[:k])
            if not any(s.startswith(prefix + ".") for s in sourced):
                return prefix
        return name

    def _inserted_mode(self, prefix: str, names: list[str], module: nn.Module) -> str:
        mode = self.options.inserted_mode(prefix) or self.options.rule_for("inserted", names[0]).rule
        if mode == "auto":
            mode = "identity" if isinstance(module, nn.Linear) else "residual"
        return mode

    def _plan_inserted(self, prefix: str, names: list[str]) -> dict[str, ParamPlan]:
        module = self.new_struct.modules.get(prefix)
        if module is None:
            # A new tensor on an existing module, such as a bias that the old layer lacked.
            return {n: self._whole(n, "inserted", RuleChoice("zero"), "new tensor of an existing module; zero adds nothing", concrete=ZERO) for n in names}
        mode = self._inserted_mode(prefix, names, module)
        if mode == "default":
            return {n: self._whole(n, "inserted", RuleChoice("default", (("scale", 1.0),)), f"inserted module {prefix!r} with default init") for n in names}
        if mode == "identity":
            return self._plan_identity(prefix, module, names)
        return self._plan_residual(prefix, names)

    def _plan_identity(self, prefix: str, module: nn.Module, names: list[str]) -> dict[str, ParamPlan]:
        if not isinstance(module, nn.Linear) or module.in_features != module.out_features:
            raise PlanError(
                f"inserted module {prefix!r} is a {type(module).__name__}; an identity init needs a square "
                "nn.Linear. Set 'inserted' for it to 'residual' or 'default' in the options"
            )
        order = self.call_order()
        issue = None
        if prefix in order:
            position = order.index(prefix)
            before = self.new_struct.modules.get(order[position - 1]) if position > 0 else None
            after = self.new_struct.modules.get(order[position + 1]) if position + 1 < len(order) else None
            if isinstance(after, ACTIVATION_TYPES) and not isinstance(before, ACTIVATION_TYPES):
                issue = f"the identity layer {prefix!r} is followed by a ReLU but its input is not a ReLU output, so negative inputs change"
        else:
            issue = f"module {prefix!r} is never called in a forward pass"
        plans = {}
        for name in names:
            local = name[len(prefix) + 1:]
            concrete = ("eye", ()) if local == "weight" else ZERO
            plans[name] = self._whole(name, "inserted", RuleChoice("identity"),
                                      f"identity layer {prefix!r} (Net2Net): weight I, bias 0", concrete=concrete, issue=issue)
            issue = None
        return plans

    def _residual_projection(self, prefix: str, names: list[str]) -> tuple[str, bool]:
        """Return the output projection of an inserted residual block and whether a norm runs after it."""
        projections, post_ln = self._residual_projections(prefix, names)
        return projections[-1], post_ln

    def _residual_projections(self, prefix: str, names: list[str]) -> tuple[list[str], bool]:
        """Return the output projection of every sublayer of an inserted residual block.

        A norm inside the block starts a new sublayer (pre-LN: ``x + attn(LN(x))``, then
        ``x + ffn(LN(x))``), so the last parameterised module before each such norm is a
        sublayer's output projection, and so is the block's last parameterised module.
        Also return whether a norm runs after the last projection (post-LN).
        """
        order = [m for m in self.call_order() if m.startswith(prefix + ".") or m == prefix]
        owners = {n.rpartition(".")[0] for n in names}
        with_params = [m for m in order if m in owners and not isinstance(self.new_struct.modules[m], NORM_TYPES)]
        if not with_params:
            raise PlanError(f"inserted module {prefix!r} is never called in a forward pass; cannot find its output projection")
        projections: list[str] = []
        last_seen: str | None = None
        for module in order:
            if isinstance(self.new_struct.modules[module], NORM_TYPES):
                if last_seen is not None and last_seen not in projections:
                    projections.append(last_seen)
                last_seen = None
            elif module in with_params:
                last_seen = module
        if with_params[-1] not in projections:
            projections.append(with_params[-1])
        later = order[order.index(with_params[-1]) + 1:]
        return projections, any(isinstance(self.new_struct.modules[m], NORM_TYPES) for m in later)

    def _plan_residual(self, prefix: str, names: list[str]) -> dict[str, ParamPlan]:
        projections, post_ln = self._residual_projections(prefix, names)
        projection = projections[-1]
        issue = None
        if post_ln:
            issue = (f"a normalisation layer inside {prefix!r} runs after its output projection {projection!r} "
                     "(post-LN), so a zero projection does not make the block an identity")
            if prefix in self.post_ln_mismatch:
                issue += f", and no LayerNorm weight and bias can move into it: {self.post_ln_mismatch[prefix]}"
        plans = {}
        for name in names:
            owner = name.rpartition(".")[0]
            if owner == projection:
                plans[name] = self._whole(name, "inserted", RuleChoice("residual"),
                                          f"output projection of inserted residual block {prefix!r}: zero", concrete=ZERO, issue=issue)
                issue = None
            elif owner in projections:
                plans[name] = self._whole(name, "inserted", RuleChoice("residual"),
                                          f"output projection of a sublayer of inserted residual block {prefix!r}: zero",
                                          concrete=ZERO, exact_override=True)
            else:
                plans[name] = self._whole(name, "inserted", RuleChoice("default", (("scale", 1.0),)),
                                          f"inside inserted residual block {prefix!r}; default init", exact_override=True)
        return plans

    # Post-LN blocks ---------------------------------------------------------------------

    def _find_moved_affines(self, inserted: dict[str, list[str]]) -> dict[str, MovedAffine]:
        """Find the inserted post-LN blocks that become identities, keyed by module prefix.

        Blocks are taken in call order, so in a run of inserted blocks each one takes the
        weight and bias from the last norm of the block before it. Blocks where the
        construction does not apply get their reason in ``post_ln_mismatch``.
        """
        blocks: list[PostLNBlock] = []
        for prefix, names in inserted.items():
            module = self.new_struct.modules.get(prefix)
            if module is None or self._inserted_mode(prefix, names, module) != "residual":
                continue
            try:
                _, post_ln = self._residual_projection(prefix, names)
            except PlanError:
                continue
            if not post_ln:
                continue
            try:
                block = find_post_ln_block(prefix, self.call_sequence(), self.new_struct.modules)
                self._check_block_tensors(block, names)
            except PostLNMismatch as e:
                self.post_ln_mismatch[prefix] = str(e)
                continue
            blocks.append(block)
        order = self.call_order()
        blocks.sort(key=lambda b: order.index(b.norms[0]))

        moved: dict[str, MovedAffine] = {}
        by_last_norm: dict[str, MovedAffine] = {}
        for block in blocks:
            try:
                entry = self._moved_affine(block, by_last_norm)
            except PostLNMismatch as e:
                self.post_ln_mismatch[block.prefix] = str(e)
                continue
            moved[block.prefix] = entry
            by_last_norm[block.last_norm] = entry
        return moved

    def _check_block_tensors(self, block: PostLNBlock, names: list[str]) -> None:
        members = set(names)
        for module_name in (*block.projections, *block.norms):
            for local, _ in self.new_struct.modules[module_name].named_parameters(recurse=False):
                name = f"{module_name}.{local}"
                if name not in members:
                    raise PostLNMismatch(f"{name!r} is not a new tensor of the inserted block, so the plan cannot set it")

    def _moved_affine(self, block: PostLNBlock, by_last_norm: dict[str, MovedAffine]) -> MovedAffine:
        """Find where the weight and bias that the block's last norm takes come from."""
        previous = block.previous
        if previous in by_last_norm:
            earlier = by_last_norm[previous]
            self._check_receiver(block, earlier.tensors, previous)
            earlier.handed_on = True
            return MovedAffine(block, earlier.origin, earlier.tensors, False, earlier.eps + block.eps[1:])

        tensors = affine_tensors(self.new_struct.modules[previous])
        self._check_receiver(block, tensors, previous)
        if not tensors:
            return MovedAffine(block, None, (), False, block.eps)

        tied = self.new.imap.tied
        names = [f"{previous}.{local}" for local in tensors]
        if any(name not in self.sources or name in tied for name in names):
            raise PostLNMismatch(
                f"the LayerNorm {previous!r} before it is neither an old LayerNorm nor the last norm "
                "of another inserted post-LN block"
            )
        origin = self.sources[names[0]].rpartition(".")[0]
        old_module = self.old_struct.modules.get(origin)
        if not isinstance(old_module, nn.LayerNorm) or affine_tensors(old_module) != tensors:
            raise PostLNMismatch(f"{previous!r} takes its {' and '.join(tensors)} from {origin!r}, which is not a "
                                 "LayerNorm with the same affine tensors in the old model")

        for local, name in zip(tensors, names):
            source = f"{origin}.{local}"
            if self.sources[name] != source:
                raise PostLNMismatch(f"the {local} of {previous!r} comes from {self.sources[name]!r}, not from {source!r}")
            old_shape = self.old_state[source][0]
            new_shape = self.new_state[f"{block.last_norm}.{local}"][0]
            if old_shape != new_shape:
                raise PostLNMismatch(
                    f"the old {source} has shape {list(old_shape)} but {block.last_norm}.{local} "
                    f"has {list(new_shape)}, so it cannot take the old values"
                )
        return MovedAffine(block, origin, tensors, True, (float(old_module.eps), *block.eps))

    def _check_receiver(self, block: PostLNBlock, tensors: tuple[str, ...], previous: str) -> None:
        present = affine_tensors(self.new_struct.modules[block.last_norm])
        for local in tensors:
            if local not in present:
                raise PostLNMismatch(
                    f"its last norm {block.last_norm!r} has no {local}, so it cannot take the {local} of {previous!r}"
                )

    def _plan_post_ln(self, entry: MovedAffine, names: list[str]) -> dict[str, ParamPlan]:
        """Plan an inserted post-LN block as an identity, and the LayerNorm before it."""
        block = entry.block
        prefix = block.prefix
        projections = set(block.projections)
        inner_norms = set(block.norms[:-1])
        plans: dict[str, ParamPlan] = {}
        for name in names:
            owner, _, local = name.rpartition(".")
            if owner in projections:
                plans[name] = self._whole(name, "inserted", RuleChoice("residual"),
                                          f"output projection of a sublayer of inserted post-LN block {prefix!r}: zero",
                                          concrete=ZERO)
            elif owner in inner_norms or (owner == block.last_norm and (entry.handed_on or local not in entry.tensors)):
                plans[name] = self._whole(name, "inserted", RuleChoice("residual"),
                                          f"norm inside inserted post-LN block {prefix!r}: weight 1, bias 0, so it "
                                          "returns its normalised input", concrete=ONES if local == "weight" else ZERO)
            elif owner == block.last_norm:
                plans[name] = self._moved_affine_plan(name, f"{entry.origin}.{local}", entry)
            else:
                plans[name] = self._whole(name, "inserted", RuleChoice("default", (("scale", 1.0),)),
                                          f"inside inserted post-LN block {prefix!r}; default init, multiplied by a "
                                          "zero projection", exact_override=True)
        if entry.resets_previous:
            for local in entry.tensors:
                name = f"{block.previous}.{local}"
                plans[name] = self._whole(
                    name, "inserted", RuleChoice("residual"),
                    f"{' and '.join(entry.tensors)} moved to {block.last_norm!r} of inserted post-LN block "
                    f"{prefix!r}; weight 1, bias 0, so it returns its normalised input",
                    concrete=ONES if local == "weight" else ZERO,
                )
        issue = self._post_ln_issue(entry)
        if issue is not None:
            # The tensor that carries the moved weight, or else the first zero projection, is marked approximate.
            moved = [f"{block.last_norm}.{local}" for local in entry.tensors if not entry.handed_on]
            holder = (moved or [n for n in names if n.rpartition(".")[0] in projections])[0]
            notes = list(plans[holder].notes)
            self._issue(holder, issue, max(entry.eps), notes)
            plans[holder] = replace(plans[holder], notes=tuple(notes), exact=False)
        return plans

    def _moved_affine_plan(self, name: str, source: str, entry: MovedAffine) -> ParamPlan:
        """Copy an old LayerNorm tensor, element by element, into the last norm of an inserted block."""
        block = entry.block
        new_map = self.new.imap.params[name]
        shape = tuple(new_map.shape)
        roles = tuple(new_map.roles[i] if i < len(new_map.roles) else "" for i in range(len(shape)))
        notes = [f"last norm of inserted post-LN block {block.prefix!r}: takes the old {source!r}, so the "
                 f"block returns what the old LayerNorm {entry.origin!r} returned"]
        return ParamPlan(
            name=name,
            shape=shape,
            dtype=self.new_state[name][1],
            source=source,
            source_shape=tuple(self.old_state[source][0]),
            axes=tuple(AxisPlan.from_index(list(range(size)), role) for size, role in zip(shape, roles)),
            notes=tuple(notes),
        )

    def _post_ln_issue(self, entry: MovedAffine) -> str | None:
        """Return why the identity construction is not exact for the block, or None when it is."""
        eps = max(entry.eps)
        if entry.handed_on or eps <= EXACT_EPS:
            return None
        return (
            f"inserted post-LN block {entry.block.prefix!r} is an identity only up to the LayerNorm eps: "
            f"eps {eps:g} is above {EXACT_EPS:g}, and the block's output differs by a relative error of about "
            f"eps / (2 * var), where var is the variance of the input of the LayerNorm that runs before "
            f"the inserted blocks ({eps:.1g} at var = 0.5)"
        )
