"""Registry layout: where models, versions, tags and claims live under the root URL.

::

    <root>/<model>/<version>/model-00001-of-00003.safetensors   model shards
    <root>/<model>/<version>/model.safetensors.index.json
    <root>/<model>/<version>/optimizer-00001-of-00001.safetensors  optional
    <root>/<model>/<version>/optimizer.safetensors.index.json      optional
    <root>/<model>/<version>/config.json, vocab.txt, ...         extra files
    <root>/<model>/<version>/.claim           the run that claimed the version
    <root>/<model>/<version>/manifest.json    written last; its presence publishes
    <root>/<model>/refs/<tag>                 tag: JSON naming one version

Model names, version ids and tag names are single path components that start with a
letter or digit and contain only letters, digits, ``.``, ``_`` and ``-``.
"""

from __future__ import annotations

import re

from pipeline.storage.errors import InvalidNameError

MANIFEST_NAME = "manifest.json"
CLAIM_NAME = ".claim"
REFS_DIR = "refs"
LOCK_SUFFIX = ".lock"
MODEL_PART = "model"
OPTIMIZER_PART = "optimizer"
PARTS = (MODEL_PART, OPTIMIZER_PART)
NEXT_VERSION = "next"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_INTEGER = re.compile(r"^[0-9]+$")
# Shard files that ShardedWriter names for either part.
_SHARD_FILE = re.compile(r"^(model|optimizer)-[0-9]{5,}-of-[0-9]{5,}\.safetensors$")


def index_name(part: str) -> str:
    """Return the index file name of a part, for example ``model.safetensors.index.json``."""
    return f"{part}.safetensors.index.json"


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidNameError(
            f"{what} {value!r} is invalid; expected 1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def validate_model_name(model: object) -> str:
    """Raise InvalidNameError unless ``model`` is a usable model name, and return it."""
    return _check_name(model, "model name")


def validate_version(version: object) -> str:
    """Raise InvalidNameError unless ``version`` is a usable explicit version id, and return it."""
    _check_name(version, "version id")
    if version in (NEXT_VERSION, REFS_DIR):
        raise InvalidNameError(
            f"version id {version!r} is reserved ({NEXT_VERSION!r} allocates the next integer "
            f"id, {REFS_DIR!r} contains the tags); pick another version id"
        )
    return version  # type: ignore[return-value]


def validate_tag(tag: object) -> str:
    """Raise InvalidNameError unless ``tag`` is a usable tag name, and return it."""
    _check_name(tag, "tag name")
    if tag.endswith(LOCK_SUFFIX):  # type: ignore[union-attr]
        raise InvalidNameError(
            f"tag name {tag!r} ends with {LOCK_SUFFIX!r}, which is reserved for the lock files "
            "of tag updates; pick another tag name"
        )
    return tag  # type: ignore[return-value]


def validate_extra_file(name: object) -> str:
    """Raise InvalidNameError unless ``name`` may be added to a version as an extra file."""
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name:
        raise InvalidNameError(
            f"extra file name {name!r} is invalid; expected a plain file name that does not "
            "start with '.' (for example 'config.json')"
        )
    if name == MANIFEST_NAME or name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
        raise InvalidNameError(
            f"extra file name {name!r} is reserved for the manifest or checkpoint data; write "
            "tensors through Publication.writer() and pick another name for other files"
        )
    return name


def integer_version(version: str) -> int | None:
    """Return the integer value of a version id made of digits only, else None."""
    return int(version) if _INTEGER.match(version) else None


def version_sort_key(version: str) -> tuple[int, int, str]:
    """Sort key that puts integer ids first in numeric order, then other ids by name."""
    number = integer_version(version)
    return (0, number, "") if number is not None else (1, 0, version)


def is_shard_file(name: str) -> bool:
    return bool(_SHARD_FILE.match(name))


class Layout:
    """Paths inside one registry, relative to its root path on the filesystem."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if self.root != "/" else "/" + "/".join(parts)

    def model(self, model: str) -> str:
        return self.join(model)

    def version(self, model: str, version: str) -> str:
        return self.join(model, version)

    def file(self, model: str, version: str, name: str) -> str:
        return self.join(model, version, name)

    def manifest(self, model: str, version: str) -> str:
        return self.file(model, version, MANIFEST_NAME)

    def claim(self, model: str, version: str) -> str:
        return self.file(model, version, CLAIM_NAME)

    def refs(self, model: str) -> str:
        return self.join(model, REFS_DIR)

    def tag(self, model: str, tag: str) -> str:
        return self.join(model, REFS_DIR, tag)
