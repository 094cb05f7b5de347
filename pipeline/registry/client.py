"""The registry client: list, resolve, tag, publish and collect garbage.

Example (the training fleet)::

    version = Registry("s3://bucket/registry").resolve("policy", "latest")
    version.load_into(module)

A reference (``ref``) names a version id or a tag. A version id with a manifest wins,
and a tag name may not equal a published version id, so a reference never has two
meanings.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Mapping

from pipeline.registry import claims, refs
from pipeline.registry.errors import (
    ModelNotFoundError,
    VersionExistsError,
    VersionNotFoundError,
)
from pipeline.registry.layout import (
    LOCK_SUFFIX,
    MANIFEST_NAME,
    NEXT_VERSION,
    REFS_DIR,
    Layout,
    validate_model_name,
    validate_tag,
    validate_version,
    version_sort_key,
)
from pipeline.registry.manifest import Manifest, parse_manifest
from pipeline.registry.publish import Publication
from pipeline.registry.refs import TagState
from pipeline.registry.store import ObjectStore, open_store
from pipeline.registry.version import ModelVersion
from pipeline.storage import fsio
from pipeline.storage.errors import InvalidNameError

if TYPE_CHECKING:
    from datetime import datetime

    from pipeline.registry.gc import GcReport

logger = logging.getLogger(__name__)

# Attempts to claim a 'next' version when other runs claim the same ids at the same time.
NEXT_ATTEMPTS = 20
DEFAULT_GRACE = timedelta(hours=24)
# Default of Registry.move_tag's ``expected``: read the tag's state just before the move.
_CURRENT: Any = object()


class Registry:
    """A checkpoint registry at an fsspec URL (``file://``, ``s3://``, ``memory://``, a plain path).

    ``storage_options`` go to fsspec (for S3, for example
    ``{"client_kwargs": {"endpoint_url": ...}}``). The object pickles as its URL and
    options, so it can be sent to Dask workers.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        fs, path = fsio.resolve(url, self.storage_options)
        self.url = fsio.url_of(fs, path).rstrip("/")
        self._store: ObjectStore | None = None
        self._layout: Layout | None = None

    # -- plumbing -----------------------------------------------------------------

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store, root = open_store(self.url, self.storage_options)
            self._layout = Layout(root)
        return self._store

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self.store  # noqa: B018  (opens the store and sets the layout)
        assert self._layout is not None
        return self._layout

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.url = state["url"]
        self.storage_options = state["storage_options"]
        self._store = None
        self._layout = None

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    def model_url(self, model: str) -> str:
        return f"{self.url}/{model}"

    def version_url(self, model: str, version: str) -> str:
        return f"{self.url}/{model}/{version}"

    # -- reading ------------------------------------------------------------------

    def models(self) -> list[str]:
        """Return the model names in the registry (folders with a valid model name)."""
        names = []
        for name in self.store.list_dirs(self.layout.root):
            try:
                names.append(validate_model_name(name))
            except InvalidNameError:
                continue
        return names

    def versions(self, model: str) -> list[str]:
        """Return the published versions of ``model`` (those with a manifest), integers first."""
        validate_model_name(model)
        model_path = self.layout.model(model)
        published = set()
        for stored in self.store.walk(model_path):
            parts = stored.path[len(model_path.rstrip("/")) + 1 :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST_NAME and parts[0] != REFS_DIR:
                published.add(parts[0])
        return sorted(published, key=version_sort_key)

    def tags(self, model: str) -> dict[str, TagState]:
        """Return every tag of ``model`` with its state."""
        validate_model_name(model)
        found = {}
        for tag in refs.list_tags(self.store, self.layout, model):
            try:
                state = refs.read_tag(self.store, self.layout, model, tag)
            except InvalidNameError:
                continue
            if state is not None:
                found[tag] = state
        return found

    def read_tag(self, model: str, tag: str) -> TagState | None:
        """Return the state of ``tag`` (with the token for compare-and-swap), or None."""
        return refs.read_tag(self.store, self.layout, validate_model_name(model), tag)

    def manifest(self, model: str, version: str) -> Manifest:
        """Read and validate the manifest of ``version``; VersionNotFoundError when it has none."""
        validate_model_name(model)
        validate_version(version)
        path = self.layout.manifest(model, version)
        try:
            data = self.store.read(path)
        except FileNotFoundError as e:
            raise self._not_found(model, version) from e
        return parse_manifest(data, url=self.store.url(path), model=model, version=version)

    def get(self, model: str, version: str) -> ModelVersion:
        """Return the published ``version`` of ``model`` (a version id, not a tag)."""
        return ModelVersion(self, self.manifest(model, version))

    def resolve(self, model: str, ref: str) -> ModelVersion:
        """Return the version that ``ref`` (a version id or a tag) names, with a validated manifest."""
        validate_model_name(model)
        if not isinstance(ref, str) or not ref:
            raise InvalidNameError(f"reference {ref!r} is invalid; expected a version id or a tag name")
        try:
            is_version = validate_version(ref) == ref
        except InvalidNameError:
            is_version = False
        if is_version and self.store.exists(self.layout.manifest(model, ref)):
            return self.get(model, ref)
        try:
            state = self.read_tag(model, validate_tag(ref))
        except InvalidNameError:
            state = None
        if state is not None:
            try:
                return self.get(model, state.version)
            except VersionNotFoundError as e:
                raise VersionNotFoundError(f"tag {ref!r} of model {model!r} points to a version without a manifest: {e}") from e
        raise self._not_found(model, ref)

    def _not_found(self, model: str, version: str) -> Exception:
        store, layout = self.store, self.layout
        if not store.list_names(layout.model(model)):
            known = ", ".join(self.models()) or "none"
            return ModelNotFoundError(f"model {model!r} not found in registry {self.url}; models: {known}")
        if store.walk(layout.version(model, version)):
            message = (
                f"version {version} of model {model!r} has no manifest; it was never published "
                "or its publication failed"
            )
            found = claims.read_claim(store, layout, model, version)
            if found is not None:
                message += f" (claimed by {found[0].describe()}; it may still be in progress)"
            return VersionNotFoundError(f"{message}. {self._available(model).capitalize()}")
        return VersionNotFoundError(f"model {model!r} has no version or tag {version!r}; {self._available(model)}")

    def _available(self, model: str) -> str:
        versions = ", ".join(self.versions(model)) or "none"
        tags = ", ".join(refs.list_tags(self.store, self.layout, model)) or "none"
        return f"published versions: {versions}; tags: {tags}"

    # -- writing ------------------------------------------------------------------

    def move_tag(self, model: str, tag: str, ref: str, *, expected: Any = _CURRENT) -> TagState:
        """Point ``tag`` at the version that ``ref`` names, by compare-and-swap; return the new state.

        ``expected`` is the TagState read earlier with :meth:`read_tag` (None: the tag
        must not exist). Without it the tag is read now and moved from that state. Raises
        TagConflictError when the tag changed in between.
        """
        validate_model_name(model)
        validate_tag(tag)
        self.check_tag_name_free(model, tag)
        target = self.resolve(model, ref)
        state = self.read_tag(model, tag) if expected is _CURRENT else expected
        return refs.move_tag(self.store, self.layout, model, tag, target.version, state)  # type: ignore[arg-type]

    def check_tag_name_free(self, model: str, tag: str) -> None:
        """Raise InvalidNameError when ``tag`` equals a published version id, which would shadow it."""
        if self.store.exists(self.layout.manifest(model, tag)):
            raise InvalidNameError(
                f"tag name {tag!r} equals a published version id of model {model!r}; a reference "
                "to it would name the version, so pick another tag name"
            )

    def begin_publish(self, model: str, version: str = NEXT_VERSION, *, run_id: str | None = None) -> Publication:
        """Claim ``version`` (an id, or ``"next"``) of ``model`` and return the Publication.

        Raises VersionExistsError naming the version when it is published, claimed by
        another run, or contains leftover files. See :mod:`pipeline.registry.publish`.
        """
        validate_model_name(model)
        run_id = run_id or uuid.uuid4().hex
        if version == NEXT_VERSION:
            for _ in range(NEXT_ATTEMPTS):
                candidate = claims.next_version(self.store, self.layout, model)
                try:
                    return self._claim(model, candidate, run_id)
                except VersionExistsError:
                    logger.info("version %s of model %r was claimed by another run; trying the next", candidate, model)
            raise VersionExistsError(
                f"could not claim a 'next' version of model {model!r} in {NEXT_ATTEMPTS} attempts, "
                "because other runs claimed each candidate first; retry later"
            )
        validate_version(version)
        if not version.endswith(LOCK_SUFFIX) and self.read_tag(model, version) is not None:
            raise InvalidNameError(
                f"version id {version!r} equals a tag of model {model!r}; a reference to it would "
                "become ambiguous, so pick another version id"
            )
        return self._claim(model, version, run_id)

    def _claim(self, model: str, version: str, run_id: str) -> Publication:
        store, layout = self.store, self.layout
        claim = claims.create_claim(store, layout, model, version, run_id)
        leftovers = [s.path for s in store.walk(layout.version(model, version)) if s.path != layout.claim(model, version)]
        if leftovers:
            store.remove(layout.claim(model, version))
            if store.exists(layout.manifest(model, version)):
                raise VersionExistsError(claims.describe_taken(store, layout, model, version))
            raise VersionExistsError(
                f"version {version} of model {model!r} has no manifest but contains "
                f"{len(leftovers)} leftover files, for example {store.url(leftovers[0])}; run "
                "`surgery registry gc` to remove them or pick another version id"
            )
        return Publication(self, model, version, run_id, claim)

    def gc(
        self,
        model: str | None = None,
        *,
        grace: timedelta = DEFAULT_GRACE,
        dry_run: bool = False,
        now: "datetime | None" = None,
    ) -> "GcReport":
        """Remove unpublished versions, stale tag locks and S3 uploads older than ``grace``.

        See :mod:`pipeline.registry.gc`.
        """
        from pipeline.registry.gc import collect_garbage

        return collect_garbage(self, model, grace=grace, dry_run=dry_run, now=now)

