"""Surrogates for attention: scaled dot-product attention and ``nn.MultiheadAttention``.

Attention is two products of activations around a softmax. With the rules of
:mod:`pipeline.maps.gradient.pointwise`, the scores ``q @ k^T`` are non-zero wherever a
query or a key row depends on the probe, the softmax is ``s + mean(s)`` over the allowed
keys, and the output is non-zero wherever the weights or an allowed value row are. An
attention mask is honoured: a key that a query may not attend to adds nothing to it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from pipeline.maps.gradient.errors import GradientMapError
from pipeline.maps.gradient.pointwise import linear, multilinear

Mode = Any


def scaled_dot_product_attention(mode: Mode, func: Callable, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Any = None, enable_gqa: bool = False) -> torch.Tensor:
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key = mode.follow(key.repeat_interleave(repeats, -3), key)
        value = mode.follow(value.repeat_interleave(repeats, -3), value)
    allowed = _allowed(attn_mask, is_causal, query.shape[-2], key.shape[-2])
    weights = _attention_weights(mode, query, key, allowed, scale)
    return _attend(mode, weights, value, allowed)


def _allowed(attn_mask: Any, is_causal: bool, queries: int, keys: int) -> torch.Tensor | None:
    """Return a boolean mask of the keys each query attends to, or None when it attends to all."""
    allowed = None
    if is_causal:
        allowed = torch.ones(queries, keys, dtype=torch.bool).tril()
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype == torch.bool else torch.isfinite(attn_mask)
        allowed = mask if allowed is None else allowed & mask
    return allowed


def _attention_weights(mode: Mode, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None,
                       scale: Any) -> torch.Tensor:
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if not (mode.is_activation(query) or mode.is_activation(key)):
        # Constant queries and keys: the real softmax, which is positive where allowed.
        scores = torch.matmul(query, key.transpose(-2, -1)) * scale
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, -1)

    # Every tensor computed here from an activation must be marked as one: an unmarked
    # tensor that requires grad would be taken for a weight.
    transposed = mode.follow(key.transpose(-2, -1), key)
    scores = multilinear(mode, torch.matmul, [query, transposed]) * scale
    if allowed is None:
        return mode.mark(scores + scores.mean(-1, keepdim=True))
    allowed_float = allowed.to(scores.dtype)
    scores = scores * allowed_float
    count = allowed_float.sum(-1, keepdim=True).clamp(min=1)
    return mode.mark((scores + scores.sum(-1, keepdim=True) / count) * allowed_float)


def _attend(mode: Mode, weights: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    if mode.is_activation(weights) and mode.is_activation(value):
        # The product of two activations, as in ``multilinear``, but the ones that stand in
        # for the weights keep the mask.
        ones = torch.ones_like(weights) if allowed is None else allowed.to(weights.dtype).expand_as(weights)
        return mode.mark(torch.matmul(weights, torch.ones_like(value)) + torch.matmul(ones, value))
    if mode.is_activation(weights) or mode.is_activation(value):
        return multilinear(mode, torch.matmul, [weights, value])
    return torch.matmul(weights, value)


# nn.MultiheadAttention ---------------------------------------------------------------------

_MHA_PARAMETERS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
    "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias",
    "training", "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight",
    "q_proj_weight", "k_proj_weight", "v_proj_weight", "static_k", "static_v",
    "average_attn_weights", "is_causal",
)  # fmt: skip


def multi_head_attention(mode: Mode, func: Callable, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Surrogate of ``F.multi_head_attention_forward`` (sequence-first, as the module calls it)."""
    call = dict(zip(_MHA_PARAMETERS, args))
    call.update(kwargs)
    for option in ("bias_k", "bias_v", "static_k", "static_v"):
        if call.get(option) is not None:
            raise GradientMapError(
                f"nn.MultiheadAttention with {option} is not supported by the gradient method; "
                "map this model with the set method"
            )
    if call.get("add_zero_attn"):
        raise GradientMapError(
            "nn.MultiheadAttention with add_zero_attn=True is not supported by the gradient "
            "method; map this model with the set method"
        )

    query, key, value = call["query"], call["key"], call["value"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = (mode.follow(t.unsqueeze(1), t) for t in (query, key, value))
    heads = call["num_heads"]

    q_weight, k_weight, v_weight = _projection_weights(call)
    bias = call.get("in_proj_bias")
    q_bias, k_bias, v_bias = bias.chunk(3) if bias is not None else (None, None, None)
    q = _heads(mode, linear(mode, None, query, q_weight, q_bias), heads)
    k = _heads(mode, linear(mode, None, key, k_weight, k_bias), heads)
    v = _heads(mode, linear(mode, None, value, v_weight, v_bias), heads)

    allowed = _mha_allowed(call, batch=query.shape[1], heads=heads, queries=query.shape[0], keys=key.shape[0])
    weights = _attention_weights(mode, q, k, allowed, None)
    attended = _attend(mode, weights, v, allowed)  # [N, H, L, head_dim]
    length, batch, width = query.shape[0], query.shape[1], query.shape[2]
    merged = attended.permute(2, 0, 1, 3).reshape(length, batch, width)
    if mode.is_activation(attended):
        merged = mode.mark(merged)
    output = linear(mode, None, merged, call["out_proj_weight"], call.get("out_proj_bias"))

    returned_weights = None
    if call.get("need_weights", True):
        returned_weights = weights.mean(1) if call.get("average_attn_weights", True) else weights
    if unbatched:
        output = output.squeeze(1)
        returned_weights = returned_weights.squeeze(0) if returned_weights is not None else None
    return output, returned_weights


def _projection_weights(call: dict[str, Any]) -> tuple[Any, Any, Any]:
    if call.get("use_separate_proj_weight"):
        return call["q_proj_weight"], call["k_proj_weight"], call["v_proj_weight"]
    return call["in_proj_weight"].chunk(3)


def _heads(mode: Mode, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Reshape ``[L, N, E]`` to ``[N, heads, L, E / heads]``."""
    length, batch, width = x.shape
    split = x.reshape(length, batch, heads, width // heads).permute(1, 2, 0, 3)
    return mode.mark(split) if mode.is_activation(x) else split


def _mha_allowed(call: dict[str, Any], batch: int, heads: int, queries: int, keys: int) -> torch.Tensor | None:
    attn_mask = call.get("attn_mask")
    allowed = None
    if attn_mask is not None:
        # Unlike scaled_dot_product_attention, a boolean mask here is True where attention is NOT allowed.
        allowed = ~attn_mask if attn_mask.dtype == torch.bool else torch.isfinite(attn_mask)
    if allowed is not None and allowed.dim() == 3:
        allowed = allowed.reshape(batch, heads, queries, keys)
    padding = call.get("key_padding_mask")
    if padding is not None:
        # True (or -inf) in key_padding_mask marks a key to ignore.
        ignored = padding if padding.dtype == torch.bool else ~torch.isfinite(padding)
        keep = (~ignored).reshape(batch, 1, 1, keys)
        allowed = keep if allowed is None else allowed & keep
    return allowed
