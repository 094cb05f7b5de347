"""Validation of tensor names and shard file names.

A tensor name is any non-empty string without NUL inside a safetensors shard, so
``encoder/layer.0.weight`` is a valid name there. A name becomes a path when it is
used to build a file or object name: the shard files that an index or a DCP metadata
file points to, or a per-tensor file that a later layer may write. At that point the
name must also be a single path component that cannot leave its directory, which
:func:`validate_tensor_name` checks with ``as_path=True``.
"""

from __future__ import annotations

from pipeline.storage.errors import InvalidNameError

_PATH_SEPARATORS = ("/", "\\")


def validate_tensor_name(name: object, *, as_path: bool = False, where: str = "") -> str:
    """Raise InvalidNameError unless ``name`` is a usable tensor name, and return it.

    Every name must be a non-empty string without NUL characters. With ``as_path``
    the name must also contain no ``/`` or ``\\`` and no ``..``, because it becomes a
    file or object name and must stay inside its directory. ``where`` names the file
    or index the name came from, for the error message.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(name, str):
        raise InvalidNameError(
            f"{prefix}tensor name {name!r} is a {type(name).__name__}, expected a string"
        )
    if not name:
        raise InvalidNameError(f"{prefix}tensor name is empty; every tensor needs a name")
    if "\x00" in name:
        raise InvalidNameError(f"{prefix}tensor name {name!r} contains a NUL character")
    if as_path:
        _check_path_component(name, f"{prefix}tensor name {name!r}")
    return name


def validate_shard_file(file: object, *, where: str = "", tensor: str | None = None) -> str:
    """Raise InvalidNameError unless ``file`` is a plain file name, and return it.

    Shard files of an index and chunk files of a DCP checkpoint must lie in the
    checkpoint's own directory, so their names may not contain path separators or
    ``..``. ``where`` and ``tensor`` name the index (or metadata file) and the tensor
    that points to the shard, for the error message.
    """
    prefix = f"{where}: " if where else ""
    subject = f"shard file {file!r}"
    if tensor is not None:
        subject += f" (for tensor {tensor!r})"
    if not isinstance(file, str) or not file:
        raise InvalidNameError(f"{prefix}{subject} is not a non-empty string")
    if "\x00" in file:
        raise InvalidNameError(f"{prefix}{subject} contains a NUL character")
    _check_path_component(file, f"{prefix}{subject}")
    return file


def _check_path_component(value: str, subject: str) -> None:
    for separator in _PATH_SEPARATORS:
        if separator in value:
            raise InvalidNameError(
                f"{subject} contains {separator!r}, but it is used as a file name and must be "
                "a single path component; rename it"
            )
    if ".." in value or value == ".":
        raise InvalidNameError(
            f"{subject} contains '..' or is '.', but it is used as a file name and could "
            "leave its directory; rename it"
        )
