"""Plan construction: from the old and new models' maps and options to a :class:`Plan`.

For every tensor of the new state dict, the planner finds its source by name after the
parameter renames and matches each axis (:mod:`pipeline.plan.match`). It then splits the
new elements into boxes by the kind of their indices and picks an init rule per box from
the axis roles:

- a box that is new along an ``in`` axis because of a new feature: ``new_input``;
- rows of new categories (the ``in`` axis of an embedding): ``new_category``;
- a box that feeds new fields of an existing output: ``new_output``; of a new output:
  ``new_head``;
- a box that is new only along ``in`` axes, through new units, feeds old units:
  ``new_unit_out``. Any other box with new units contains their incoming weights and
  biases: ``new_unit``.

Tensors with no source are new heads, branches that read only new inputs, or inserted
modules (``inserted``, planned by :mod:`pipeline.plan.inserted`). Old input columns of
removed constant fields are folded into biases. Planning reads no checkpoint: it works on
reduced maps and per-axis index maps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from itertools import product
from typing import Any

from torch import nn

from pipeline.maps.interaction import InteractionMap
from pipeline.models.spec import ModelSpec
from pipeline.plan import rules
from pipeline.plan.match import CATEGORY, FEATURE, HEAD, OUTPUT, UNIT, SignatureTable, match_axis
from pipeline.plan.model import (
    AxisPlan, DroppedParam, Fold, InitRegion, ParamPlan, Plan, PlanError, canonical_json, range_indices, ranges_of,
)
from pipeline.plan.options import (
    ModelNames, PlanOptions, RuleChoice, check_constants, check_names, expand_atom_renames,
)
from pipeline.plan.inserted import InsertedPlanning
from pipeline.plan.structure import ModelStructure, call_sequence
from pipeline.schema import FeatureSchema

logger = logging.getLogger(__name__)


@dataclass
class ModelSide:
    """One side of a plan: a model (built on the meta device is enough), its schema and map."""

    module: nn.Module
    schema: FeatureSchema
    imap: InteractionMap
    spec: ModelSpec | None = None

    @classmethod
    def from_spec(cls, spec: ModelSpec, imap: InteractionMap | None = None) -> "ModelSide":
        """Build the model of ``spec`` on the meta device and compute its set map unless given."""
        from pipeline.maps.propagate import set_map

        module, schema = spec.build(device="meta")
        if imap is None:
            imap = set_map(module, schema)
        return cls(module, schema, imap, spec)


def plan_specs(old: ModelSpec, new: ModelSpec, options: PlanOptions | None = None) -> Plan:
    """Build both models on the meta device, map them and plan the surgery."""
    return build_plan(ModelSide.from_spec(old), ModelSide.from_spec(new), options)


@dataclass
class _Issue:
    """A reason why the plan cannot be exact, with an estimated relative error."""

    where: str
    message: str
    error: float


@dataclass
class _Planner(InsertedPlanning):
    old: ModelSide
    new: ModelSide
    options: PlanOptions
    issues: list[_Issue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    region_errors: list[float] = field(default_factory=list)
    post_ln_mismatch: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        opts = self.options
        self.atom_renames = expand_atom_renames(opts, self.old.schema, self.new.schema)
        self.constants = check_constants(opts, self.old.schema, self.new.schema, self.atom_renames)
        self.old_struct = ModelStructure(self.old.module)
        self.new_struct = ModelStructure(self.new.module)
        self.old_state = _state_names(self.old.module)
        self.new_state = _state_names(self.new.module)
        check_names(
            opts,
            ModelNames(self.old.schema, tuple(self.old_state), tuple(self.old_struct.modules)),
            ModelNames(self.new.schema, tuple(self.new_state), tuple(self.new_struct.modules)),
        )

        old_texts = [self.atom_renames.get(str(a), str(a)) for a in self.old.imap.atoms]
        new_texts = [str(a) for a in self.new.imap.atoms]
        shared = set(old_texts) & set(new_texts)
        self.removed = [str(a) for a, t in zip(self.old.imap.atoms, old_texts) if t not in shared]
        self.old_table = SignatureTable(self.old.imap, old_texts, shared)
        self.new_table = SignatureTable(self.new.imap, new_texts, shared)
        self.kept_outputs = {t.partition(":")[2].partition("/")[0] for t in shared if t.startswith("output:")}
        self.new_output_names = {o.name for o in self.new.schema.outputs}
        self.sources = self._match_names()
        self._sequence: list[str] | None = None

    # Names ------------------------------------------------------------------------------

    def _rename(self, name: str) -> str:
        best = None
        for old_prefix, new_prefix in self.options.param_renames:
            if name == old_prefix or name.startswith(old_prefix + "."):
                if best is None or len(old_prefix) > len(best[0]):
                    best = (old_prefix, new_prefix)
        if best is None:
            return name
        return best[1] + name[len(best[0]):]

    def _match_names(self) -> dict[str, str]:
        sources: dict[str, str] = {}
        for old_name in self.old_state:
            target = self._rename(old_name)
            if target in self.new_state:
                if target in sources:
                    raise PlanError(
                        f"{self.options.source}: rename.params sends both {sources[target]!r} and "
                        f"{old_name!r} to {target!r}; each new tensor takes one source"
                    )
                sources[target] = old_name
        return sources

    def call_sequence(self) -> list[str]:
        """Return the new model's leaf modules once per call of a forward pass."""
        if self._sequence is None:
            self._sequence = call_sequence(self.new.module, self.new.schema)
        return self._sequence

    def call_order(self) -> list[str]:
        """Return the new model's leaf modules in the order of their first call."""
        return list(dict.fromkeys(self.call_sequence()))

    # Whole plan -------------------------------------------------------------------------

    def run(self) -> Plan:
        new_imap = self.new.imap
        plans: dict[str, ParamPlan] = {}
        fold_columns: dict[str, list[tuple[int, int, float, str]]] = {}
        seen_removed: set[str] = set()
        unsourced = [n for n in self.new_state if n in new_imap.params and n not in new_imap.tied and n not in self.sources]
        whole, inserted = self._classify_unsourced(unsourced)
        moved = self._find_moved_affines(inserted)
        # The LayerNorms whose weight and bias move into an inserted post-LN block are planned with it.
        reset = {f"{m.block.previous}.{local}" for m in moved.values() if m.resets_previous for local in m.tensors}
        for name in self.new_state:
            if name in new_imap.params and name not in new_imap.tied and name in self.sources and name not in reset:
                plans[name] = self._plan_sourced(name, fold_columns, seen_removed)
        for name, pp in self._plan_unsourced(whole, inserted, moved).items():
            plans[name] = pp
        self._attach_folds(plans, fold_columns)
        self._check_removed(seen_removed)
        for name in self.new_state:
            if name in new_imap.tied:
                target = new_imap.tied[name]
                plans[name] = ParamPlan(name, plans[target].shape, plans[target].dtype, tied_to=target)
            elif name not in plans:
                plans[name] = self._plan_buffer(name, plans)

        used = {pp.source for pp in plans.values() if pp.source}
        dropped = tuple(
            DroppedParam(old, self.old_state[old][0], "no parameter of the new model takes it; check rename.params if it moved")
            for old in self.old_state
            if old not in used and old not in self.old.imap.tied
        )
        return self._finish([plans[n] for n in self.new_state], dropped)

    def _finish(self, params: list[ParamPlan], dropped: tuple[DroppedParam, ...]) -> Plan:
        if self.issues and not self.options.accept_approximate:
            lines = "\n".join(f"  {i.where}: {i.message}" for i in self.issues)
            raise PlanError(
                f"the plan cannot keep the old function exactly:\n{lines}\n"
                "Set 'accept_approximate: true' in the options to build it anyway."
            )
        errors = [i.error for i in self.issues] + self.region_errors
        notes = list(self.notes) + [f"approximate: {i.where}: {i.message}" for i in self.issues]
        exact = not self.issues and all(pp.exact for pp in params)
        removed_fields = {
            str(a): self.constants.get(str(a), self.old.schema.input(a.source).absent_value(a.name))
            for a in self.old.schema.input_atoms()
            if a.kind == "field" and str(a) in self.removed
        }
        return Plan(
            params=tuple(params),
            dropped=dropped,
            seed=self.options.seed,
            old_model=canonical_json(self.old.spec.to_json()) if self.old.spec else "",
            new_model=canonical_json(self.new.spec.to_json()) if self.new.spec else "",
            renames=tuple(sorted(self.atom_renames.items())),
            constants=tuple(sorted(removed_fields.items())),
            notes=tuple(notes),
            exact=exact,
            expected_error=0.0 if exact else float(max(errors, default=1.0)),
            options=self.options.raw,
        )

    # Sourced parameters -----------------------------------------------------------------

    def _plan_sourced(self, name: str, fold_columns, seen_removed) -> ParamPlan:
        source = self.sources[name]
        new_map = self.new.imap.params[name]
        old_key = self.old.imap.tied.get(source, source)
        if old_key not in self.old.imap.params:
            raise PlanError(f"parameter {name!r} takes its values from {source!r}, which is a buffer of the old model, not a parameter")
        old_map = self.old.imap.params[old_key]
        if len(old_map.shape) != len(new_map.shape):
            raise PlanError(
                f"parameter {name!r} has shape {list(new_map.shape)} but its source {source!r} has "
                f"{list(old_map.shape)}; a plan cannot change the number of axes"
            )
        roles = _roles(new_map.roles, len(new_map.shape))
        blocks = self.options.blocks_for(name) or self.new_struct.blocks(name)
        replicate = self.options.widen == "net2net"
        notes: list[str] = []
        exact = True
        axes: list[AxisPlan] = []
        labels: list[list[tuple]] = []
        new_sigs_per_axis = []
        for axis, role in enumerate(roles):
            old_sigs = self.old_table.axis(old_map, axis)
            new_sigs = self.new_table.axis(new_map, axis)
            if axis == 0:
                old_sigs = self._embedding_rows(source, old_sigs, self.old, self.old_struct, self.old_table)
                new_sigs = self._embedding_rows(name, new_sigs, self.new, self.new_struct, self.new_table)
            new_sigs_per_axis.append(new_sigs)
            match = match_axis(old_sigs, new_sigs, blocks.get(axis, 1), role, self.kept_outputs,
                               self.new_output_names, name, axis, replicate)
            if match.groups and (match.positional > 1 or len(old_sigs) != len(new_sigs)):
                notes.append(f"axis {axis}: {match.positional} indices matched by position within {match.groups} shared signature(s)")
            scale = None
            if match.replicas:
                notes.append(f"axis {axis}: {len(match.replicas)} new indices replicate old units (Net2Net)")
                if "in" in role:
                    counts: dict[int, int] = {}
                    for old_index in match.index:
                        if old_index >= 0:
                            counts[old_index] = counts.get(old_index, 0) + 1
                    scale = [1.0 / counts[o] if o >= 0 else 1.0 for o in match.index]
                if self.new_struct.is_attention(name) or self.new_struct.is_norm(name):
                    self._issue(name, "Net2Net replication breaks attention scores and normalisation statistics", 1.0, notes)
                    exact = False
            axes.append(AxisPlan.from_index(match.index, role, blocks.get(axis, 1), scale))
            labels.append(self._labels(match, new_sigs))
            for old_index, kind in match.dropped:
                if kind == FEATURE and "in" in role:
                    atoms = sorted(old_sigs[old_index].raw_in)
                    seen_removed.update(self._untranslated(atoms))
                    fold_columns.setdefault(name, []).append((axis, old_index, *self._column_constant(name, atoms)))
            narrowed = sum(1 for _, kind in match.dropped if kind == UNIT)
            if narrowed:
                self._issue(name, f"axis {axis} drops {narrowed} old indices whose signature has no match in the new "
                                  "model: a narrower layer, or atoms renamed without rename.atoms", 1.0, notes)
                exact = False
            new_units = sum(1 for k in match.kinds if k == UNIT)
            if new_units and self.new_struct.is_norm(name):
                self._issue(
                    name,
                    f"{new_units} new units enter the normalisation statistics of {type(self.new_struct.owner(name)[1]).__name__}",
                    new_units / max(len(new_sigs), 1), notes,
                )
                exact = False

        regions, regions_exact = self._regions(name, tuple(new_map.shape), axes, labels, roles, new_sigs_per_axis)
        return ParamPlan(
            name=name,
            shape=tuple(new_map.shape),
            dtype=self.new_state[name][1],
            source=source,
            source_shape=tuple(old_map.shape),
            axes=tuple(axes),
            regions=regions,
            notes=tuple(notes),
            exact=exact and regions_exact,
        )

    def _embedding_rows(self, name: str, sigs: list, side: ModelSide, struct: ModelStructure, table: SignatureTable) -> list:
        """Give each row of an embedding table the input signature of its category alone.

        Row ``c`` of an ``nn.Embedding`` is selected only by category ``c`` of the vocabulary
        that indexes it. When the table is tied to another use (an output layer over the
        same vocabulary), the map records the union of both uses, so every row carries every
        category and rows would match by position. The row's own category is restored when
        exactly one vocabulary reaches the table and its length equals the table's rows.
        """
        names = [name] + [alias for alias, target in side.imap.tied.items() if target == name]
        owners = [struct.owner(n)[1] for n in names if n.rpartition(".")[0] in struct.modules]
        if not any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in owners):
            return sigs
        if all(len(sig.raw_in) <= 1 for sig in sigs):
            return sigs
        vocabularies = {atom.partition(":")[2].partition("/")[0] for sig in sigs for atom in sig.raw_in if atom.startswith("category:")}
        if len(vocabularies) != 1:
            return sigs
        vocabulary = vocabularies.pop()
        tokens = side.schema.vocabularies.get(vocabulary, ())
        if len(tokens) != len(sigs):
            return sigs
        refined = []
        for sig, token in zip(sigs, tokens):
            atom = f"category:{vocabulary}/{token}"
            if side is self.old:
                atom = self.atom_renames.get(atom, atom)
            own = frozenset({atom})
            refined.append(replace(sig, raw_in=own, proj_in=own & table.shared))
        return refined

    def _untranslated(self, atoms) -> set[str]:
        back = {v: k for k, v in self.atom_renames.items()}
        return {back.get(a, a) for a in atoms}

    def _column_constant(self, name: str, atoms: list[str]) -> tuple[float, str]:
        """Return (constant, atoms text) of a removed column; its atoms are all removed fields."""
        values = []
        for atom in self._untranslated(atoms):
            if atom in self.constants:
                values.append(self.constants[atom])
            else:
                kind, _, rest = atom.partition(":")
                source, _, field_name = rest.partition("/")
                values.append(self.old.schema.input(source).absent_value(field_name) if kind == "field" else 0.0)
        if len(values) == 1:
            return values[0], ",".join(atoms)
        if all(v == 0.0 for v in values):
            return 0.0, ",".join(atoms)
        self._issue(name, f"a removed column mixes the fields {atoms}; their constants cannot be folded", 1.0, None)
        return 0.0, ",".join(atoms)

    def _labels(self, match, new_sigs) -> list[tuple]:
        out = []
        for i, kind in enumerate(match.kinds):
            if kind is None:
                out.append(("old",))
            elif kind == FEATURE:
                out.append((FEATURE, self._absent_zero(new_sigs[i].raw_in)))
            elif kind == CATEGORY:
                vocabularies = sorted({a.partition(":")[2].partition("/")[0] for a in new_sigs[i].raw_in})
                out.append((CATEGORY, ",".join(vocabularies)))
            elif kind == OUTPUT:
                names = sorted({a.partition(":")[2].partition("/")[0] for a in new_sigs[i].raw_out})
                out.append((OUTPUT, ",".join(names)))
            else:
                out.append((kind,))
        return out

    def _absent_zero(self, atoms) -> bool:
        for atom in atoms:
            kind, _, rest = atom.partition(":")
            source, _, field_name = rest.partition("/")
            if kind == "field" and self.new.schema.input(source).absent_value(field_name) != 0.0:
                return False
        return True

    def _regions(self, name, shape, axes, labels, roles, new_sigs_per_axis) -> tuple[tuple[InitRegion, ...], bool]:
        partitions = []
        for axis_labels in labels:
            groups: dict[tuple, list[int]] = {}
            for i, label in enumerate(axis_labels):
                groups.setdefault(label, []).append(i)
            partitions.append([(label, ranges_of(indices)) for label, indices in groups.items()])
        bias_like = all("in" not in r for r in roles)
        built = []
        for combo in product(*partitions):
            if all(label == ("old",) for label, _ in combo):
                continue
            situation, detail, info = self._situation(combo, roles)
            choice = self.options.rule_for(situation, name, detail)
            resolved = self._resolve(choice, situation, name, shape, combo, roles, axes, bias_like, info, new_sigs_per_axis)
            built.append((rules.SITUATION_ORDER.index(situation), situation, tuple(r for _, r in combo), resolved))
        built.sort(key=lambda item: item[0])
        built = _merge_boxes(built)
        regions = []
        exact = True
        for k, (_, situation, box, resolved) in enumerate(built):
            regions.append(InitRegion(box, resolved.rule, resolved.params, rules.derive_seed(self.options.seed, name, k), situation, resolved.exact))
            if not resolved.exact:
                exact = False
                self.region_errors.append(resolved.error)
                note = f"{name}: {situation} rule {resolved.rule}: {resolved.note} (estimated relative error {resolved.error:.2g})"
                if note not in self.notes:
                    self.notes.append(note)
        return tuple(regions), exact

    def _situation(self, combo, roles) -> tuple[str, str | None, dict[str, Any]]:
        in_labels = [label for (label, _), role in zip(combo, roles) if "in" in role and label != ("old",)]
        out_new = [label for (label, _), role in zip(combo, roles) if "in" not in role and label != ("old",)]
        features = [label for label in in_labels if label[0] == FEATURE]
        if features:
            return "new_input", None, {"absent_zero": all(label[1] for label in features)}
        categories = [label for label in in_labels if label[0] == CATEGORY]
        if categories:
            return "new_category", categories[0][1], {}
        every = in_labels + out_new
        outputs = [label for label in every if label[0] == OUTPUT]
        if outputs:
            return "new_output", outputs[0][1], {}
        if any(label[0] == HEAD for label in every):
            return "new_head", None, {}
        if in_labels and not out_new:
            return "new_unit_out", None, {}
        return "new_unit", None, {}

    def _resolve(self, choice: RuleChoice, situation, name, shape, combo, roles, axes, bias_like, info, new_sigs_per_axis):
        category_axis = None
        old_rows: tuple = ()
        copy_row = None
        fields_old = fields_new = 0
        fan_new = 0
        for axis, ((label, ranges), role) in enumerate(zip(combo, roles)):
            count = sum(b - a for a, b in ranges)
            if label[0] == CATEGORY and "in" in role:
                category_axis = axis
                old_rows = axes[axis].mapped_ranges()
                if choice.rule == "copy_row":
                    copy_row = self._row_of(name, axis, label[1], choice.param("token"), new_sigs_per_axis[axis])
            if label[0] == OUTPUT:
                fields_new = count
                fields_old = axes[axis].mapped_count()
            if "in" in role and label[0] == UNIT:
                fan_new += count
        init = self.new_struct.default_init(name, shape)
        try:
            return rules.resolve(
                choice, situation, init=init, bias_like=bias_like, absent_zero=info.get("absent_zero", True),
                fan_new=fan_new, fields_old=fields_old, fields_new=fields_new,
                category_axis=category_axis, old_rows=old_rows, copy_row=copy_row,
            )
        except PlanError as e:
            raise PlanError(f"parameter {name!r}, situation {situation}: {e}") from e

    def _row_of(self, name, axis, vocabulary, token, sigs) -> int:
        atom = f"category:{vocabulary}/{token}"
        for i, sig in enumerate(sigs):
            if sig.raw_in == frozenset({atom}):
                if atom not in sig.proj_in:
                    raise PlanError(
                        f"{self.options.source}: categories.{vocabulary}: token {token!r} is new in the "
                        f"new model, so parameter {name!r} has no trained row to copy; name an existing token"
                    )
                return i
        raise PlanError(f"{self.options.source}: categories.{vocabulary}: parameter {name!r} has no row for token {token!r}")

    # Parameters without a source --------------------------------------------------------

    def _whole(self, name: str, situation: str, choice: RuleChoice, note: str, *, exact_override: bool | None = None,
               concrete: tuple[str, tuple] | None = None, issue: str | None = None) -> ParamPlan:
        """Plan a tensor with no source as one region over all of it."""
        new_map = self.new.imap.params[name]
        shape = tuple(new_map.shape)
        roles = _roles(new_map.roles, len(shape))
        bias_like = all("in" not in r for r in roles)
        if concrete is not None:
            rule, params, exact = concrete[0], concrete[1], True
        else:
            resolved = rules.resolve(choice, situation, init=self.new_struct.default_init(name, shape), bias_like=bias_like)
            rule, params, exact = resolved.rule, resolved.params, resolved.exact
            if exact_override is not None:
                exact = exact_override
            elif not exact:
                self.region_errors.append(resolved.error)
                self.notes.append(f"{name}: {situation} rule {rule}: {resolved.note} (estimated relative error {resolved.error:.2g})")
        notes = [note]
        if issue:
            self._issue(name, issue, 1.0, notes)
            exact = False
        box = tuple(((0, size),) for size in shape)
        region = InitRegion(box, rule, params, rules.derive_seed(self.options.seed, name, 0), situation, exact)
        return ParamPlan(
            name=name, shape=shape, dtype=self.new_state[name][1],
            axes=tuple(AxisPlan.new(size, role) for size, role in zip(shape, roles)),
            regions=(region,) if region.count() else (), notes=tuple(notes), exact=exact,
        )

    # Folds, removed fields, buffers -----------------------------------------------------

    def _attach_folds(self, plans: dict[str, ParamPlan], fold_columns) -> None:
        for name, columns in fold_columns.items():
            nonzero = [c for c in columns if c[2] != 0.0]
            if not nonzero:
                continue
            weight = plans[name]
            axes_used = {axis for axis, *_ in nonzero}
            bias_name = self._bias_of(name)
            bias = plans.get(bias_name) if bias_name else None
            if len(weight.shape) != 2 or axes_used != {1} or bias is None or bias.source is None or len(bias.shape) != 1 or bias.shape[0] != weight.shape[0]:
                atoms = sorted({c[3] for c in nonzero})
                self._issue(name, f"removed constant fields {atoms} cannot be folded: {name!r} has no matching bias "
                                  "or is not a 2-D weight", 1.0, None)
                continue
            fold = Fold(weight.source, 1, 0, tuple(c[1] for c in nonzero), tuple(c[2] for c in nonzero), tuple(c[3] for c in nonzero))
            plans[bias_name] = _replace(bias, folds=bias.folds + (fold,), notes=bias.notes + (f"folds {len(nonzero)} constant column(s) of {weight.source!r}",))

    def _bias_of(self, weight_name: str) -> str | None:
        prefix, _, local = weight_name.rpartition(".")
        if local == "weight":
            candidate = f"{prefix}.bias" if prefix else "bias"
        elif local.startswith("weight_"):
            candidate = (f"{prefix}." if prefix else "") + "bias_" + local[len("weight_"):]
        else:
            return None
        return candidate if candidate in self.new.imap.params else None

    def _check_removed(self, seen: set[str]) -> None:
        fields = [a for a in self.removed if a.startswith("field:")]
        for atom in fields:
            if atom in seen:
                continue
            used = any(atom in self.old_table.whole(p).raw_in for p in self.old.imap.params.values())
            if used:
                self._issue(atom, "the removed field reaches the old model only mixed with other inputs, so it cannot be dropped or folded", 1.0, None)

    def _plan_buffer(self, name: str, plans: dict[str, ParamPlan]) -> ParamPlan:
        shape, dtype = self.new_state[name]
        source = self.sources.get(name)
        prefix, module, local = self.new_struct.owner(name)
        if source is not None and self.old_state[source][0] == shape and not _follows_weight(module, local, plans, prefix, shape):
            axes = tuple(AxisPlan.from_index(list(range(size))) for size in shape)
            return ParamPlan(name, shape, dtype, "buffer", source, shape, axes, notes=("buffer copied",))
        if _follows_weight(module, local, plans, prefix, shape):
            weight = plans[f"{prefix}.weight"]
            value = 1.0 if local == "running_var" else 0.0
            axis = weight.axes[0]
            if source is None:
                axis = AxisPlan.new(shape[0], axis.role)
            regions = ()
            new_ranges = axis.new_ranges()
            if new_ranges:
                regions = (InitRegion((new_ranges,), "constant", (("value", value),), 0, "new_unit", True),)
            return ParamPlan(name, shape, dtype, "buffer", source, self.old_state[source][0] if source else (), (axis,), regions,
                             notes=(f"BatchNorm statistic follows {prefix}.weight; new channels get {value:g}",))
        if source is None and local == "num_batches_tracked":
            return ParamPlan(name, shape, dtype, "buffer", None, (), (), (InitRegion((), "zero", (), 0, "new_unit", True),),
                             notes=("new BatchNorm counter starts at 0",))
        if source is None:
            raise PlanError(
                f"buffer {name!r} of the new model has no source in the old model; a plan cannot know "
                "its value. Add rename.params for it if it moved"
            )
        raise PlanError(
            f"buffer {name!r} changes shape from {list(self.old_state[source][0])} to {list(shape)}; plans "
            "carry unchanged buffers and BatchNorm statistics only"
        )

    # Issues -----------------------------------------------------------------------------

    def _issue(self, where: str, message: str, error: float, notes: list[str] | None) -> None:
        self.issues.append(_Issue(where, message, error))
        if notes is not None:
            notes.append(f"not exact: {message}")


def build_plan(old: ModelSide, new: ModelSide, options: PlanOptions | None = None) -> Plan:
    """Build the surgery plan from ``old`` to ``new``.

    Raises :class:`PlanError` for invalid options. It also raises for plans that cannot be
    exact unless the options set ``accept_approximate``: a fold without a bias, new units
    under a LayerNorm, a post-LN inserted block that no LayerNorm weight and bias can move
    into, or a narrower layer.
    """
    started = time.perf_counter()
    planner = _Planner(old, new, options or PlanOptions())
    plan = planner.run()
    logger.info("plan: %d tensors, exact=%s, in %.2f s", len(plan.params), plan.exact, time.perf_counter() - started)
    return plan


def _state_names(module: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Return {name: (shape, dtype)} of every state-dict entry, tied parameters included."""
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        out[name] = (tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
    return out


def _merge_boxes(built: list) -> list:
    """Merge regions with the same situation and rule whose boxes differ on one axis only.

    Boxes come from a product of per-axis partitions, so such a pair unions into one box.
    """
    merged = list(built)
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                a, b = merged[i], merged[j]
                if a[0] != b[0] or a[1] != b[1] or a[3] != b[3]:
                    continue
                differing = [k for k, (x, y) in enumerate(zip(a[2], b[2])) if x != y]
                if len(differing) != 1:
                    continue
                axis = differing[0]
                union = ranges_of(sorted(set(range_indices(a[2][axis])) | set(range_indices(b[2][axis]))))
                box = a[2][:axis] + (union,) + a[2][axis + 1:]
                merged[i] = (a[0], a[1], box, a[3])
                del merged[j]
                changed = True
                break
            if changed:
                break
    return merged


def _roles(roles: tuple[str, ...], ndim: int) -> tuple[str, ...]:
    return tuple(roles[i] if i < len(roles) else "" for i in range(ndim))


def _follows_weight(module: nn.Module, local: str, plans: dict[str, ParamPlan], prefix: str, shape) -> bool:
    return (
        isinstance(module, nn.modules.batchnorm._NormBase)
        and local in ("running_mean", "running_var")
        and f"{prefix}.weight" in plans
        and plans[f"{prefix}.weight"].shape == shape
    )


def _replace(pp: ParamPlan, **changes) -> ParamPlan:
    from dataclasses import replace

    return replace(pp, **changes)
