"""The set interpreter: runs a model once on the meta device and propagates atom sets.

Call order:

1. :func:`pipeline.maps.propagate.set_map` builds the module on the meta device, so no
   parameter is materialised, and registers every parameter with the interpreter.
2. Inputs are meta tensors whose values are :class:`SetValue`: each element of a
   continuous input carries its field's atom, each element of a categorical input carries
   every category of its vocabulary.
3. The module runs under :class:`SetDispatchMode`, a ``TorchDispatchMode``. Every ATen op
   first runs on meta tensors (which yields output shapes), then its rule from
   :mod:`pipeline.maps.propagate.rules` maps input values to output values.
4. Recurrent ops (``torch.lstm``, ``torch.gru`` ...) are caught one level up by
   :class:`RecurrenceMode`, a ``TorchFunctionMode``, which reruns them with their final
   state fed back until the state's sets stop growing.
5. Output fields are attached to the outputs and the engine's tape runs backwards.

An op without a rule raises :class:`UnsupportedOpError` naming the op and the module path.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline.maps.propagate.engine import Engine, Operand
from pipeline.maps.propagate.values import ParamRecord, ParamView, SetValue

logger = logging.getLogger(__name__)

Rule = Callable[["Interpreter", Any, tuple, dict, Any], None]
RULES: dict[str, Rule] = {}


class UnsupportedOpError(NotImplementedError):
    """An op that set propagation has no rule for."""


class PropagationError(RuntimeError):
    """An op failed during set propagation; the message names the op and module path."""


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule for ATen ops given by packet name, e.g. ``"addmm"``."""

    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


class Interpreter:
    """Keeps the value of every live tensor, the parameter records and the module path."""

    def __init__(self) -> None:
        self.engine = Engine()
        self.table = self.engine.table
        self.params: dict[str, ParamRecord] = {}
        self._values: dict[int, Operand] = {}
        self._param_ids: dict[int, ParamRecord] = {}
        self.module_stack: list[str] = []

    # Registration -----------------------------------------------------------------------

    def register_params(self, module: nn.Module) -> dict[str, str]:
        """Register each distinct parameter under its first name; return tied aliases."""
        tied: dict[str, str] = {}
        first_name: dict[int, str] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            key = id(param)
            if key in first_name:
                tied[name] = first_name[key]
                continue
            first_name[key] = name
            record = ParamRecord(name, tuple(param.shape))
            self.params[name] = record
            self._param_ids[key] = record
        return tied

    # Values -----------------------------------------------------------------------------

    def value(self, tensor: Any) -> Operand:
        if not isinstance(tensor, torch.Tensor):
            return None
        key = id(tensor)
        found = self._values.get(key)
        if found is not None:
            return found
        record = self._param_ids.get(key)
        if record is not None:
            return (ParamView.whole(record),)
        return None

    def assign(self, tensor: torch.Tensor, value: Operand) -> None:
        if value is None:
            self._values.pop(id(tensor), None)
            return
        key = id(tensor)
        if key not in self._values:
            weakref.finalize(tensor, self._values.pop, key, None)
        self._values[key] = value

    def tracked(self, args: tuple, kwargs: dict) -> bool:
        flat, _ = tree_flatten((args, kwargs))
        return any(self.value(t) is not None for t in flat if isinstance(t, torch.Tensor))

    def module_path(self) -> str:
        return self.module_stack[-1] if self.module_stack else "<root>"

    # Dispatch ---------------------------------------------------------------------------

    def handle(self, func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        if not self.tracked(args, kwargs):
            return out
        name = func.overloadpacket.__name__
        handler = RULES.get(name)
        if handler is None and name.endswith("_"):
            # In-place variants (transpose_, unsqueeze_ ...) return their first argument,
            # whose value the out-of-place rule then replaces.
            handler = RULES.get(name[:-1])
        if handler is None and torch.Tag.pointwise in func.tags:
            handler = RULES["<pointwise>"]
        if handler is None:
            raise UnsupportedOpError(
                f"no set-propagation rule for op aten.{name} ({func}) in module "
                f"{self.module_path()!r}; the map cannot be computed for this model. "
                "Rewrite that part of the model with supported ops or add a rule in "
                "pipeline.maps.propagate.rules"
            )
        try:
            handler(self, func, args, kwargs, out)
        except (UnsupportedOpError, PropagationError):
            raise
        except Exception as e:
            raise PropagationError(
                f"set propagation failed at op {func} in module {self.module_path()!r}: {e}"
            ) from e
        return out


class SetDispatchMode(TorchDispatchMode):
    """Runs every ATen op on meta tensors, then applies its set rule."""

    def __init__(self, interpreter: Interpreter) -> None:
        super().__init__()
        self.interpreter = interpreter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        interpreter = self.interpreter
        name = func.overloadpacket.__name__
        if name.endswith("_") and args and isinstance(args[0], torch.Tensor) and interpreter.tracked(args, kwargs):
            # An in-place op changes its first argument's shape or values; its rule needs the
            # tensor as it was, so a stand-in with the old shape takes its place.
            before = torch.empty(args[0].shape, dtype=args[0].dtype, device=args[0].device)
            interpreter.assign(before, interpreter.value(args[0]))
            out = self._run(func, args, kwargs)
            return interpreter.handle(func, (before, *args[1:]), kwargs, out)
        out = self._run(func, args, kwargs)
        return interpreter.handle(func, args, kwargs, out)

    def _run(self, func, args, kwargs):
        try:
            return func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as e:
            raise PropagationError(
                f"op {func} failed on the meta device in module "
                f"{self.interpreter.module_path()!r}: {e}. Set propagation runs the model on "
                "meta tensors, so forward() must not depend on input values"
            ) from e


class RecurrenceMode(TorchFunctionMode):
    """Iterates recurrent ops until their hidden state's sets reach a fixed point."""

    def __init__(self, interpreter: Interpreter) -> None:
        super().__init__()
        self.interpreter = interpreter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from pipeline.maps.propagate.recurrence import RECURRENT

        handler = RECURRENT.get(getattr(func, "__name__", None))
        if handler is not None and self.interpreter.tracked(args, kwargs):
            return handler(self.interpreter, func, args, kwargs)
        if func is torch.Tensor.__getitem__ and self.interpreter.tracked(args, kwargs):
            from pipeline.maps.propagate.subscript import exact_getitem

            return exact_getitem(self.interpreter, func, args)
        return func(*args, **kwargs)


class ModulePathHooks:
    """Tracks the qualified name of the module whose forward is running."""

    def __init__(self, interpreter: Interpreter, module: nn.Module) -> None:
        self.interpreter = interpreter
        self.names = {id(m): name or "<root>" for name, m in module.named_modules(remove_duplicate=False)}
        self.handles: list[Any] = []

    def __enter__(self) -> "ModulePathHooks":
        stack = self.interpreter.module_stack

        def pre(module, args):
            stack.append(self.names.get(id(module), type(module).__name__))

        def post(module, args, output):
            if stack:
                stack.pop()

        self.handles.append(nn.modules.module.register_module_forward_pre_hook(pre))
        self.handles.append(nn.modules.module.register_module_forward_hook(post, always_call=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
