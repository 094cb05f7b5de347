"""Tags: small JSON objects under ``<model>/refs/`` that name one version each.

A tag object contains ``{"version": "3", "updated_at": "<UTC ISO 8601>"}``. Tags move
only by compare-and-swap: the writer passes the :class:`TagState` it read (or None
for a tag that must not exist yet), and the move fails with TagConflictError when the
tag changed in between. See the store modules for how each backend makes that atomic.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from pipeline.registry.errors import RegistryFormatError, TagConflictError
from pipeline.registry.layout import LOCK_SUFFIX, Layout, validate_tag
from pipeline.registry.manifest import utc_now
from pipeline.registry.store import ConflictError, ObjectStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TagState:
    """A tag as read: the version it names, when it moved, and the store's token (ETag) for CAS."""

    tag: str
    version: str
    updated_at: str
    etag: str


def list_tags(store: ObjectStore, layout: Layout, model: str) -> list[str]:
    """Return the tag names of ``model``, without lock or temporary files."""
    return [
        name
        for name in store.list_names(layout.refs(model))
        if not name.startswith(".") and not name.endswith(LOCK_SUFFIX)
    ]


def read_tag(store: ObjectStore, layout: Layout, model: str, tag: str) -> TagState | None:
    """Return the state of ``tag``, or None when the tag does not exist."""
    path = layout.tag(model, validate_tag(tag))
    found = store.read_with_token(path)
    if found is None:
        return None
    data, etag = found
    try:
        document = json.loads(data.decode("utf-8"))
        version = document["version"]
        updated_at = document.get("updated_at", "")
        if not isinstance(version, str) or not version:
            raise ValueError("'version' is not a non-empty string")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise RegistryFormatError(
            f"{store.url(path)}: invalid tag object ({e}); expected JSON "
            '{"version": "<id>", "updated_at": "<time>"}. Move the tag again to rewrite it'
        ) from e
    return TagState(tag=tag, version=version, updated_at=str(updated_at), etag=etag)


def move_tag(
    store: ObjectStore,
    layout: Layout,
    model: str,
    tag: str,
    version: str,
    expected: TagState | None,
) -> TagState:
    """Point ``tag`` at ``version`` if it is still in state ``expected``; return the new state.

    The caller checks that ``version`` is published. Raises TagConflictError when the
    tag moved, appeared or disappeared since ``expected`` was read, or when another
    writer holds the tag's lock file.
    """
    path = layout.tag(model, validate_tag(tag))
    updated_at = utc_now()
    data = json.dumps({"version": version, "updated_at": updated_at}).encode("utf-8") + b"\n"
    try:
        etag = store.replace(path, data, expected.etag if expected is not None else None)
    except ConflictError as e:
        raise _conflict(store, layout, model, tag, expected, e) from e
    before = expected.version if expected is not None else "(none)"
    logger.info("moved tag %r of model %r from %s to %s", tag, model, before, version)
    return TagState(tag=tag, version=version, updated_at=updated_at, etag=etag)


def _conflict(
    store: ObjectStore, layout: Layout, model: str, tag: str, expected: TagState | None, error: ConflictError
) -> TagConflictError:
    subject = f"tag {tag!r} of model {model!r}"
    if error.locked_by is not None:
        return TagConflictError(
            f"{subject} is being moved by another writer (lock file {error.locked_by} exists). "
            "Retry; if no other writer is running, the lock is left over from a crashed one: "
            "remove it, or run `surgery registry gc` after the grace period"
        )
    current = read_tag(store, layout, model, tag)
    was = f"version {expected.version}" if expected is not None else "no tag"
    now = f"version {current.version}" if current is not None else "no tag"
    return TagConflictError(
        f"{subject} changed since it was read: expected {was}, found {now}. Another writer "
        "moved it; read the tag again and retry if the move still applies"
    )
