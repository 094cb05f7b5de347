"""Surrogates for ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh`` and ``torch.rnn_relu``.

``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` call these ops. An interaction map gives the
recurrent weights the set of the hidden state at its fixed point: the union, over time,
of everything that reaches the state when the sequence is repeated for ever. With a zero
initial state and one time step, the real op would give ``weight_hh`` a zero co-operand.

The surrogate therefore runs the recurrence over the input sequence repeated
:data:`REPEATS` times. The set of a hidden state only grows along the sequence, so after
the first pass every state contains the union of all that reaches it, and the second pass
uses saturated states: the input sets of the recurrent weights are at their fixed point.
The third pass is for the output map: the uses of the weights in the second pass flow
into later states, as they do when the sequence repeats for ever, so a recurrent weight
of hidden unit ``u`` feeds whatever any unit feeds one step later. The forward direction
returns its outputs of the last repetition and the reverse direction those of the first,
which are the ones computed after the other passes. The cell is written with the rules of
:mod:`pipeline.maps.gradient.pointwise`: gates and nonlinearities are the identity and a
product of two activations is their sum. A constant initial state (zeros, or any state
not computed from a feature input) is treated as absent.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from pipeline.maps.gradient.errors import GradientMapError
from pipeline.maps.gradient.pointwise import linear

Mode = Any

REPEATS = 3


def recurrent(mode: Mode, func: Callable, *args: Any) -> tuple[torch.Tensor, ...]:
    kind = {torch.lstm: "lstm", torch.gru: "gru", torch.rnn_tanh: "rnn", torch.rnn_relu: "rnn"}[func]
    # Padded form: (input, hx, params, has_biases, ...); packed form: (data, batch_sizes, hx, params, ...).
    if len(args) != 9 or isinstance(args[3], (list, tuple)):
        raise GradientMapError(
            f"torch.{func.__name__} on a packed sequence is not supported by the gradient method; "
            "pass a padded tensor, or map the model with the set method"
        )
    sequence, state, params, has_biases, num_layers, _dropout, _train, bidirectional, batch_first = args
    if batch_first:
        sequence = mode.follow(sequence.transpose(0, 1), sequence)
    steps = sequence.shape[0]
    directions = 2 if bidirectional else 1
    per_direction = len(params) // (num_layers * directions)
    hidden0, cell0 = (state[0], state[1]) if kind == "lstm" else (state, None)

    layer_input = mode.follow(torch.cat([sequence] * REPEATS, 0), sequence)
    final_hidden: list[torch.Tensor] = []
    final_cell: list[torch.Tensor] = []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            weights = params[index * per_direction:(index + 1) * per_direction]
            hidden = mode.mark(hidden0[index]) if mode.is_activation(hidden0) else None
            cell = mode.mark(cell0[index]) if cell0 is not None and mode.is_activation(cell0) else None
            order = range(layer_input.shape[0])
            if direction == 1:
                order = reversed(order)
            produced: dict[int, torch.Tensor] = {}
            for step in order:
                x = mode.follow(layer_input[step], layer_input)
                hidden, cell = _cell(mode, kind, x, hidden, cell, weights, has_biases)
                produced[step] = hidden
            outputs.append(mode.mark(torch.stack([produced[t] for t in range(layer_input.shape[0])], 0)))
            final_hidden.append(hidden)
            final_cell.append(cell)
        layer_input = mode.mark(torch.cat(outputs, -1)) if directions > 1 else outputs[0]

    saturated = [outputs[0][-steps:]]
    if directions == 2:
        saturated.append(outputs[1][:steps])
    output = mode.mark(torch.cat(saturated, -1))
    if batch_first:
        output = mode.mark(output.transpose(0, 1))
    hidden_n = mode.mark(torch.stack(final_hidden, 0))
    if kind == "lstm":
        return output, hidden_n, mode.mark(torch.stack(final_cell, 0))
    return output, hidden_n


def _cell(mode: Mode, kind: str, x: torch.Tensor, hidden: torch.Tensor | None,
          cell: torch.Tensor | None, weights: list[torch.Tensor], has_biases: bool) -> tuple[torch.Tensor, Any]:
    weight_ih, weight_hh = weights[0], weights[1]
    bias_ih, bias_hh = (weights[2], weights[3]) if has_biases else (None, None)
    projection = weights[-1] if len(weights) in (3, 5) else None

    from_input = linear(mode, F.linear, x, weight_ih, bias_ih)
    # With a constant (absent) state the recurrent product is left out: its co-operand
    # carries no atom, and a bias added to it would be added to nothing.
    from_hidden = linear(mode, F.linear, hidden, weight_hh, bias_hh) if hidden is not None else None
    sources = (from_input, from_hidden)

    def mark(value: torch.Tensor) -> torch.Tensor:
        return mode.follow(value, *sources)

    if kind == "lstm":
        gates = from_input if from_hidden is None else mark(from_input + from_hidden)
        input_gate, forget_gate, candidate, output_gate = (mark(g) for g in gates.chunk(4, -1))
        new_cell = input_gate + forget_gate + candidate
        if cell is not None:
            new_cell = new_cell + cell
        new_cell = mark(new_cell)
        new_hidden = mark(output_gate + new_cell)
        if projection is not None:
            new_hidden = linear(mode, F.linear, new_hidden, projection, None)
        return new_hidden, new_cell

    if kind == "gru":
        reset_x, update_x, new_x = (mark(g) for g in from_input.chunk(3, -1))
        if from_hidden is None:
            return mark(update_x + new_x), None
        reset_h, update_h, new_h = (mark(g) for g in from_hidden.chunk(3, -1))
        # n = tanh(new_x + r * new_h) and h' = (1 - z) * n + z * h, with products as sums.
        candidate = new_x + reset_x + reset_h + new_h
        return mark(candidate + update_x + update_h + hidden), None

    total = from_input if from_hidden is None else from_input + from_hidden
    return mark(total), None
