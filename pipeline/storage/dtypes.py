"""Mapping between safetensors dtype strings and torch dtypes."""

from __future__ import annotations

import torch

# The dtype strings of the safetensors format (see the safetensors README, "Format").
# Entries whose torch dtype is missing from the installed torch build are left out.
_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("F64", "float64"),
    ("F32", "float32"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I64", "int64"),
    ("I32", "int32"),
    ("I16", "int16"),
    ("I8", "int8"),
    ("U64", "uint64"),
    ("U32", "uint32"),
    ("U16", "uint16"),
    ("U8", "uint8"),
    ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("C64", "complex64"),
)

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    code: getattr(torch, attr) for code, attr in _CANDIDATES if hasattr(torch, attr)
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {
    dtype: code for code, dtype in SAFETENSORS_TO_TORCH.items()
}


def torch_dtype(code: str) -> torch.dtype:
    """Return the torch dtype for a safetensors dtype string.

    Raises KeyError for an unknown string. Callers turn it into an error that names
    the file and tensor.
    """
    return SAFETENSORS_TO_TORCH[code]


def safetensors_dtype(dtype: torch.dtype) -> str:
    """Return the safetensors dtype string for a torch dtype.

    Raises KeyError for a dtype that safetensors cannot store.
    """
    return TORCH_TO_SAFETENSORS[dtype]


def itemsize(dtype: torch.dtype) -> int:
    """Return the size of one element of ``dtype`` in bytes."""
    return dtype.itemsize
