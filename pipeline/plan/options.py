"""Plan options: renames, constants, blocks and init-rule overrides, parsed and checked.

The YAML or JSON form (every key optional)::

    seed: 0
    rename:
      params: {blocks.1: blocks.2}                      # old module or parameter -> new
      atoms: {"field:globals/is_day": "field:globals/daytime"}   # or whole sources: "field:units"
    constants: {"globals/roshan_alive": 1.0}            # removed field -> value folded into biases
    blocks: {my.gates.weight: {0: 4}}                   # axis 0 is 4 concatenated blocks
    widen: append                                       # or net2net
    init:                                               # situation -> rule
      all: {rule: small_random, std: 0.001}             # sets new_input, new_unit, new_unit_out
      new_input: zero
      new_unit: {rule: default, scale: 1.0}
      new_unit_out: zero
      new_category: zero
      new_output: {rule: mask, value: -1.0e9}
      new_head: default
      inserted: auto
    categories: {unit_types: {rule: copy_row, token: creep}}   # per vocabulary
    outputs: {value: zero}                              # per output, for new output fields
    params: {"lstm.*": {new_unit_out: {rule: small_random, std: 0.001}}}   # per parameter glob
    inserted: {blocks.1: residual}                      # per inserted module
    accept_approximate: false

:func:`parse_options` checks the syntax, and :func:`check_options` checks names against
both models. Both raise :class:`~pipeline.plan.model.PlanError` naming the entry.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.plan.model import PlanError, canonical_json
from pipeline.schema import Atom, FeatureSchema, SchemaError

# Rules a user may choose per situation; the first is the default.
SITUATION_RULES: dict[str, tuple[str, ...]] = {
    "new_input": ("zero", "default", "small_random"),
    "new_unit": ("default", "zero", "small_random"),
    "new_unit_out": ("zero", "small_random", "default"),
    "new_category": ("zero", "mean", "copy_row", "default"),
    "new_output": ("mask", "zero", "default"),
    "new_head": ("default", "zero"),
    "inserted": ("auto", "residual", "identity", "default"),
}

# Parameters of each rule with their defaults; None marks a required parameter.
RULE_PARAMS: dict[str, dict[str, Any]] = {
    "zero": {},
    "default": {"scale": 1.0},
    "small_random": {"std": 1e-3},
    "mask": {"value": -1e9},
    "mean": {},
    "copy_row": {"token": None},
    "auto": {},
    "residual": {},
    "identity": {},
}

WIDEN_MODES = ("append", "net2net")
# The situations that ``init.all`` sets.
ALL_UNIT_SITUATIONS = ("new_input", "new_unit", "new_unit_out")
_TOP_KEYS = ("seed", "rename", "constants", "blocks", "widen", "init", "categories", "outputs",
             "params", "inserted", "accept_approximate")


@dataclass(frozen=True)
class RuleChoice:
    """A rule name with its parameters (defaults filled in)."""

    rule: str
    params: tuple[tuple[str, Any], ...] = ()

    def param(self, key: str) -> Any:
        return dict(self.params)[key]

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, **dict(self.params)}


@dataclass(frozen=True)
class PlanOptions:
    """Parsed plan options; see the module docstring for the file form."""

    seed: int = 0
    param_renames: tuple[tuple[str, str], ...] = ()
    atom_renames: tuple[tuple[str, str], ...] = ()
    constants: tuple[tuple[str, float], ...] = ()
    blocks: tuple[tuple[str, int, int], ...] = ()
    widen: str = "append"
    init: tuple[tuple[str, RuleChoice], ...] = ()
    categories: tuple[tuple[str, RuleChoice], ...] = ()
    outputs: tuple[tuple[str, RuleChoice], ...] = ()
    param_init: tuple[tuple[str, str, RuleChoice], ...] = ()
    inserted: tuple[tuple[str, str], ...] = ()
    accept_approximate: bool = False
    source: str = "<options>"
    raw: str = field(default="{}", compare=False)

    def rule_for(self, situation: str, param: str, detail: str | None = None) -> RuleChoice:
        """Return the rule for a situation: per-parameter glob, then per vocabulary or
        output (``detail``), then the global choice, then the default."""
        for pattern, key, choice in self.param_init:
            if key == situation and fnmatch.fnmatchcase(param, pattern):
                return choice
        if detail is not None:
            table: dict[str, RuleChoice] = {}
            if situation == "new_category":
                table = dict(self.categories)
            elif situation == "new_output":
                table = dict(self.outputs)
            if detail in table:
                return table[detail]
        found = dict(self.init).get(situation)
        if found is not None:
            return found
        return _choice(SITUATION_RULES[situation][0], {}, f"init.{situation}")

    def blocks_for(self, param: str) -> dict[int, int]:
        return {axis: n for name, axis, n in self.blocks if name == param}

    def inserted_mode(self, module: str) -> str | None:
        return dict(self.inserted).get(module)


def load_options(path: str | Path) -> PlanOptions:
    """Read plan options from a YAML or JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PlanError(f"cannot read plan options {str(path)!r}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PlanError(f"plan options {str(path)!r} are not valid YAML or JSON: {e}") from e
    return parse_options(data, source=str(path))


def parse_options(data: Any, source: str = "<options>") -> PlanOptions:
    """Parse the options mapping, raising :class:`PlanError` that names the bad entry."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise PlanError(f"{source}: plan options must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise PlanError(f"{source}: unknown option keys {unknown}; expected some of {list(_TOP_KEYS)}")

    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PlanError(f"{source}: 'seed' must be a non-negative integer, got {seed!r}")

    rename = _mapping(data, "rename", source)
    bad = sorted(set(rename) - {"params", "atoms"})
    if bad:
        raise PlanError(f"{source}: unknown keys {bad} under 'rename'; expected 'params' and 'atoms'")
    param_renames = tuple((str(k), str(v)) for k, v in _mapping(rename, "params", source, "rename.params").items())
    atom_renames = []
    for old, new in _mapping(rename, "atoms", source, "rename.atoms").items():
        atom_renames.append((_atom_text(str(old), f"rename.atoms[{old!r}]", source),
                             _atom_text(str(new), f"rename.atoms[{old!r}]", source)))

    constants = []
    for atom, value in _mapping(data, "constants", source).items():
        text = str(atom) if ":" in str(atom) else f"field:{atom}"
        text = _atom_text(text, f"constants[{atom!r}]", source)
        if not text.startswith("field:") or "/" not in text:
            raise PlanError(f"{source}: constants[{atom!r}] must name a continuous field as 'INPUT/FIELD'")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PlanError(f"{source}: constants[{atom!r}] must be a finite number, got {value!r}")
        constants.append((text, float(value)))

    blocks = []
    for name, axes in _mapping(data, "blocks", source).items():
        if not isinstance(axes, Mapping):
            raise PlanError(f"{source}: blocks[{name!r}] must map an axis to a block count, got {axes!r}")
        for axis, count in axes.items():
            if not _is_int(axis) or int(axis) < 0 or not _is_int(count) or int(count) < 1:
                raise PlanError(f"{source}: blocks[{name!r}] entry {axis!r}: {count!r} must be axis: count with non-negative axis and positive count")
            blocks.append((str(name), int(axis), int(count)))

    widen = data.get("widen", "append")
    if widen not in WIDEN_MODES:
        raise PlanError(f"{source}: 'widen' is {widen!r}; expected one of {list(WIDEN_MODES)}")

    init = []
    init_data = _mapping(data, "init", source)
    for situation, value in init_data.items():
        if situation == "all":
            continue
        init.append((_situation(situation, f"init.{situation}", source), _parse_choice(value, situation, f"init.{situation}", source)))
    if "all" in init_data:
        # One rule for every element that new units or new inputs bring: OpenAI Five's
        # "small random everywhere" is {rule: small_random}.
        for situation in ALL_UNIT_SITUATIONS:
            if situation not in init_data:
                init.append((situation, _parse_choice(init_data["all"], situation, "init.all", source)))

    categories = [(str(v), _parse_choice(c, "new_category", f"categories.{v}", source))
                  for v, c in _mapping(data, "categories", source).items()]
    outputs = [(str(o), _parse_choice(c, "new_output", f"outputs.{o}", source))
               for o, c in _mapping(data, "outputs", source).items()]

    param_init = []
    for pattern, overrides in _mapping(data, "params", source).items():
        if not isinstance(overrides, Mapping):
            raise PlanError(f"{source}: params[{pattern!r}] must map situations to rules, got {overrides!r}")
        for situation, value in overrides.items():
            where = f"params[{pattern!r}].{situation}"
            param_init.append((str(pattern), _situation(situation, where, source), _parse_choice(value, situation, where, source)))

    inserted = []
    for module, mode in _mapping(data, "inserted", source).items():
        if mode not in SITUATION_RULES["inserted"]:
            raise PlanError(f"{source}: inserted[{module!r}] is {mode!r}; expected one of {list(SITUATION_RULES['inserted'])}")
        inserted.append((str(module), str(mode)))

    accept = data.get("accept_approximate", False)
    if not isinstance(accept, bool):
        raise PlanError(f"{source}: 'accept_approximate' must be true or false, got {accept!r}")

    return PlanOptions(
        seed=seed,
        param_renames=tuple(param_renames),
        atom_renames=tuple(atom_renames),
        constants=tuple(constants),
        blocks=tuple(blocks),
        widen=widen,
        init=tuple(init),
        categories=tuple(categories),
        outputs=tuple(outputs),
        param_init=tuple(param_init),
        inserted=tuple(inserted),
        accept_approximate=accept,
        source=source,
        raw=canonical_json(_plain(data)),
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.isdigit()


def _mapping(data: Mapping, key: str, source: str, where: str | None = None) -> Mapping:
    value = data.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PlanError(f"{source}: {where or key!r} must be a mapping, got {type(value).__name__}")
    return value


def _atom_text(text: str, where: str, source: str) -> str:
    """Validate an atom (``kind:source/name``) or a whole source (``kind:source``)."""
    if "/" not in text:
        kind, sep, name = text.partition(":")
        if sep and name and kind in ("field", "category", "output"):
            return text
    try:
        return str(Atom.parse(text))
    except SchemaError as e:
        raise PlanError(f"{source}: {where}: {e}") from e


def _situation(name: Any, where: str, source: str) -> str:
    if name not in SITUATION_RULES:
        raise PlanError(f"{source}: {where}: unknown situation {name!r}; expected 'all' or one of {list(SITUATION_RULES)}")
    return str(name)


def _parse_choice(value: Any, situation: str, where: str, source: str) -> RuleChoice:
    if isinstance(value, str):
        rule, params = value, {}
    elif isinstance(value, Mapping) and "rule" in value:
        rule, params = value["rule"], {k: v for k, v in value.items() if k != "rule"}
    else:
        raise PlanError(f"{source}: {where} must be a rule name or a mapping with 'rule', got {value!r}")
    allowed = SITUATION_RULES[situation]
    if rule not in allowed:
        raise PlanError(f"{source}: {where}: unknown init rule {rule!r} for {situation}; expected one of {list(allowed)}")
    return _choice(rule, params, where, source)


def _choice(rule: str, params: Mapping[str, Any], where: str, source: str = "<options>") -> RuleChoice:
    spec = RULE_PARAMS[rule]
    unknown = sorted(set(params) - set(spec))
    if unknown:
        raise PlanError(f"{source}: {where}: rule {rule!r} takes {sorted(spec) or 'no parameters'}, not {unknown}")
    values = {}
    for key, default in spec.items():
        value = params.get(key, default)
        if value is None:
            raise PlanError(f"{source}: {where}: rule {rule!r} needs the parameter {key!r}")
        if key == "token":
            values[key] = str(value)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PlanError(f"{source}: {where}: parameter {key!r} of rule {rule!r} must be a finite number, got {value!r}")
        if key in ("scale", "std") and value < 0:
            raise PlanError(f"{source}: {where}: parameter {key!r} must not be negative, got {value!r}")
        values[key] = float(value)
    return RuleChoice(rule, tuple(sorted(values.items())))


# Checks against the two models ------------------------------------------------------------


@dataclass(frozen=True)
class ModelNames:
    """The names that options may refer to in one model."""

    schema: FeatureSchema
    params: tuple[str, ...]
    modules: tuple[str, ...]


def expand_atom_renames(options: PlanOptions, old: FeatureSchema, new: FeatureSchema) -> dict[str, str]:
    """Check the atom renames against both schemas and expand whole-source renames.

    Returns old atom text -> new atom text. Raises :class:`PlanError` naming the entry when
    the old atom is not in the old model or the new one is not in the new model. A
    whole-source rename (``field:units`` -> ``field:entities``) renames each atom whose
    new name exists, unless the atom has its own entry; the others count as removed.
    """
    old_atoms = [str(a) for a in old.input_atoms() + old.output_atoms()]
    new_atoms = set(str(a) for a in new.input_atoms() + new.output_atoms())
    explicit = {old_text for old_text, _ in options.atom_renames if "/" in old_text}
    out: dict[str, str] = {}
    for old_text, new_text in options.atom_renames:
        where = f"{options.source}: rename.atoms[{old_text!r}]"
        if "/" in old_text:
            if old_text not in old_atoms:
                raise PlanError(f"{where}: the old model has no atom {old_text!r}; check the name against the old schema")
            if new_text not in new_atoms:
                raise PlanError(f"{where}: the new model has no atom {new_text!r} to rename to; check the name against the new schema")
            out[old_text] = new_text
            continue
        if "/" in new_text or old_text.split(":")[0] != new_text.split(":")[0]:
            raise PlanError(f"{where}: a whole-source rename maps 'KIND:SOURCE' to 'KIND:SOURCE' of the same kind, got {new_text!r}")
        members = [a for a in old_atoms if a.startswith(old_text + "/")]
        if not members:
            raise PlanError(f"{where}: the old model has no atoms under {old_text!r}")
        renamed = 0
        for atom in members:
            target = new_text + atom[len(old_text):]
            if target in new_atoms and atom not in explicit:
                out[atom] = target
                renamed += 1
        if not renamed:
            raise PlanError(f"{where}: the new model has none of the atoms of {old_text!r} under {new_text!r}")
    targets = list(out.values())
    clashes = sorted({t for t in targets if targets.count(t) > 1})
    if clashes:
        raise PlanError(f"{options.source}: rename.atoms maps several old atoms to {clashes}")
    return out


def check_constants(options: PlanOptions, old: FeatureSchema, new: FeatureSchema, renames: Mapping[str, str]) -> dict[str, float]:
    """Check that every constant names an old continuous field that the new model lacks."""
    old_fields = {str(a) for a in old.input_atoms() if a.kind == "field"}
    new_atoms = {str(a) for a in new.input_atoms()}
    out: dict[str, float] = {}
    for atom, value in options.constants:
        where = f"{options.source}: constants[{atom[len('field:'):]!r}]"
        if atom not in old_fields:
            raise PlanError(f"{where}: the old model has no continuous field {atom!r}")
        if renames.get(atom, atom) in new_atoms:
            raise PlanError(
                f"{where}: field {atom!r} is still present in the new model; a constant only "
                "applies to a removed field. Remove the entry or remove the field"
            )
        out[atom] = value
    return out


def check_names(options: PlanOptions, old: ModelNames, new: ModelNames) -> None:
    """Check parameter renames, blocks, categories, outputs, globs and inserted modules."""
    src = options.source
    old_params = set(old.params)
    for old_name, new_name in options.param_renames:
        if old_name not in old_params and not any(p.startswith(old_name + ".") for p in old_params):
            raise PlanError(f"{src}: rename.params[{old_name!r}]: the old model has no parameter or module {old_name!r}")
        if new_name not in new.params and not any(p.startswith(new_name + ".") for p in new.params):
            raise PlanError(f"{src}: rename.params[{old_name!r}]: the new model has no parameter or module {new_name!r}")
    for name, axis, _ in options.blocks:
        if name not in new.params:
            raise PlanError(f"{src}: blocks[{name!r}]: the new model has no parameter {name!r}")
    for vocabulary, choice in options.categories:
        if vocabulary not in new.schema.vocabularies:
            raise PlanError(f"{src}: categories.{vocabulary}: the new model has no vocabulary {vocabulary!r}")
        if choice.rule == "copy_row":
            token = choice.param("token")
            if token not in new.schema.vocabularies[vocabulary]:
                raise PlanError(f"{src}: categories.{vocabulary}: token {token!r} is not in the new vocabulary {vocabulary!r}")
    for situation, choice in options.init:
        if choice.rule == "copy_row":
            raise PlanError(f"{src}: init.{situation}: copy_row names a token of one vocabulary; set it under 'categories'")
    output_names = {o.name for o in new.schema.outputs}
    for output, _ in options.outputs:
        if output not in output_names:
            raise PlanError(f"{src}: outputs.{output}: the new model has no output {output!r}")
    for pattern, situation, _ in options.param_init:
        if not any(fnmatch.fnmatchcase(p, pattern) for p in new.params):
            raise PlanError(f"{src}: params[{pattern!r}]: no parameter of the new model matches")
    for module, _ in options.inserted:
        if module not in new.modules and module not in new.params:
            raise PlanError(f"{src}: inserted[{module!r}]: the new model has no module {module!r}")
