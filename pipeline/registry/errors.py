"""Exceptions raised by the checkpoint registry.

Each names the registry, model, version or tag involved, what was expected, and
what to do. Each subclasses the built-in exception that callers already catch for
that kind of failure. Digest mismatches raise the storage layer's IntegrityError, and
invalid names raise its InvalidNameError.
"""

from __future__ import annotations


class RegistryFormatError(ValueError):
    """A manifest, tag or claim document that does not follow its format."""


class ManifestError(RegistryFormatError):
    """A manifest that fails schema validation or disagrees with its location."""


class ModelNotFoundError(FileNotFoundError):
    """A model name with no folder in the registry."""


class VersionNotFoundError(FileNotFoundError):
    """A version or tag that does not resolve to a published version (one with a manifest)."""


class VersionExistsError(FileExistsError):
    """A version that is already published, claimed by another run, or contains leftover files."""


class TagConflictError(RuntimeError):
    """A compare-and-swap on a tag that lost: the tag changed since it was read."""


class ClaimLostError(RuntimeError):
    """A publication whose claim object was removed or replaced by someone else."""


class PublicationStateError(RuntimeError):
    """A Publication method called in the wrong state (commit twice, abort after commit)."""


class IncompatibleModelError(ValueError):
    """A module whose feature schema or state dict does not match a version's manifest."""
