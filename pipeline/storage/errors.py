"""Exceptions raised by the storage layer.

Every error names the URL (and the shard and tensor where there is one), states what
was expected, and states the fix. Each subclasses the built-in exception that callers
already catch for that kind of failure.
"""

from __future__ import annotations


class CheckpointFormatError(ValueError):
    """A checkpoint, shard, header or index that does not follow its format."""


class EmptyCheckpointError(CheckpointFormatError):
    """A checkpoint that contains no tensors."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A pickle that needs code to load. It is rejected before any of that code runs."""


class InvalidNameError(ValueError):
    """A tensor or shard name that cannot be used where it is used (for example as a path)."""


class IntegrityError(ValueError):
    """A shard whose size or sha256 differs from the manifest."""


class ObjectExistsError(FileExistsError):
    """A create-only write found an object already at its destination."""


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint URL, shard or index that does not exist."""


class TensorNotFoundError(KeyError):
    """A tensor name that the checkpoint does not contain."""

    def __str__(self) -> str:
        # KeyError quotes its argument with repr(); a message reads better unquoted.
        return str(self.args[0]) if self.args else ""


class ShardWriteError(RuntimeError):
    """A tensor source that produced data which does not match the shard plan."""
