"""Recurrent ops iterated to a fixed point of their hidden state's sets.

``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` call ``torch.lstm``, ``torch.gru``,
``torch.rnn_tanh`` or ``torch.rnn_relu``, which decompose into per-step ATen ops that the
dispatch mode sees. A single call with a zero initial state would leave ``weight_hh``
without atoms, although in training the state carries everything the inputs carried. So
the call is repeated with its final state fed back as the initial state until the state's
sets stop changing, and once more so that output fields flow back through a full step.
Sets only grow, so this ends after at most (number of distinct sets) rounds; in practice
two or three.
"""

from __future__ import annotations

import logging

import torch

from pipeline.maps.propagate.values import SetValue

logger = logging.getLogger(__name__)

MAX_ROUNDS = 64


def _state_ids(interpreter, state) -> list:
    tensors = state if isinstance(state, (list, tuple)) else [state]
    out = []
    for tensor in tensors:
        value = interpreter.value(tensor)
        out.append(value.ids.tolist() if isinstance(value, SetValue) else None)
    return out


def _iterate(interpreter, func, args, kwargs, state_position, split_output):
    """Call ``func`` until the state at ``args[state_position]`` reaches a fixed point."""
    args = list(args)
    previous = _state_ids(interpreter, args[state_position])
    extra_round = False
    for _ in range(MAX_ROUNDS):
        result = func(*args, **kwargs)
        state = split_output(result)
        current = _state_ids(interpreter, state)
        if extra_round:
            return result
        if current == previous:
            extra_round = True
        previous = current
        args[state_position] = state
    raise RuntimeError(f"{func.__name__} did not reach a fixed point in {MAX_ROUNDS} rounds")


def _lstm(interpreter, func, args, kwargs):
    # lstm(input, hx, params, ...) or the packed form lstm(data, batch_sizes, hx, params, ...)
    position = 1 if isinstance(args[1], (list, tuple)) else 2
    return _iterate(interpreter, func, args, kwargs, position, lambda out: [out[1], out[2]])


def _gru(interpreter, func, args, kwargs):
    position = 1 if isinstance(args[1], torch.Tensor) and args[1].dim() == 3 and not _is_packed(args) else 2
    return _iterate(interpreter, func, args, kwargs, position, lambda out: out[1])


def _is_packed(args) -> bool:
    # Packed form: (data, batch_sizes, hx, params, ...) where batch_sizes is 1-D int64.
    return isinstance(args[1], torch.Tensor) and args[1].dim() == 1 and args[1].dtype == torch.int64


def _lstm_cell(interpreter, func, args, kwargs):
    return _iterate(interpreter, func, args, kwargs, 1, lambda out: [out[0], out[1]])


def _single_cell(interpreter, func, args, kwargs):
    return _iterate(interpreter, func, args, kwargs, 1, lambda out: out)


RECURRENT = {
    "lstm": _lstm,
    "gru": _gru,
    "rnn_tanh": _gru,
    "rnn_relu": _gru,
    "lstm_cell": _lstm_cell,
    "gru_cell": _single_cell,
    "rnn_tanh_cell": _single_cell,
    "rnn_relu_cell": _single_cell,
}
