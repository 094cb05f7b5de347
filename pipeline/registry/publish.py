"""Publishing a version: claim, shards, manifest, tags.

Call order (step 2 in any process, the other steps in the process that commits):

1. ``publication = registry.begin_publish(model, version="next", run_id=...)``
   creates ``<version>/.claim`` create-only. A second run that wants the same version
   fails here with VersionExistsError, before any heavy work.
2. ``writer = publication.writer(max_shard_bytes)`` and ``plan = writer.plan_shards(specs)``;
   then ``writer.write_shard(shard, source)`` once per shard, in parallel on Dask
   workers. The writer is a plain ShardedWriter under the version folder; it and the
   Publication pickle as settings only. Optimizer state, when there is any, goes
   through ``publication.writer(max_shard_bytes, part="optimizer")``.
3. ``publication.add_file("config.json", data)`` for extra files, create-only.
4. ``publication.commit(fields, plan, records, tags=["latest"])`` checks the records
   against the plan, writes the index files, reads the shard headers back and checks
   them against the plan, fsyncs local files, and writes ``manifest.json`` create-only
   as the last object. Only then do readers see the version. Then it moves each tag
   by compare-and-swap.
5. On any failure before the manifest, ``publication.abort()`` removes every file of
   the version and then the claim. ``with registry.begin_publish(...) as publication``
   aborts on an exception, and on a block that ends without commit.

A crash anywhere before step 4 leaves a version without a manifest, which readers
never see; ``gc`` removes it after the grace period.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pipeline.registry import claims, refs
from pipeline.registry.errors import (
    ClaimLostError,
    ManifestError,
    PublicationStateError,
    TagConflictError,
    VersionExistsError,
)
from pipeline.registry.layout import (
    CLAIM_NAME,
    MODEL_PART,
    OPTIMIZER_PART,
    PARTS,
    index_name,
    validate_extra_file,
    validate_tag,
)
from pipeline.registry.manifest import Manifest, build_document, encode, publisher_fields, validate_document
from pipeline.registry.shards import check_records, index_bytes, index_problems, tensor_index
from pipeline.registry.version import ModelVersion
from pipeline.storage import SafetensorsReader, ShardedWriter, ShardPlan, ShardRecord
from pipeline.storage.errors import ObjectExistsError
from pipeline.storage.plan import DEFAULT_MAX_SHARD_BYTES
from pipeline.storage.sinks import DEFAULT_PART_BYTES

if TYPE_CHECKING:
    from pipeline.registry.client import Registry

logger = logging.getLogger(__name__)

TagRequest = Sequence[str] | Mapping[str, "refs.TagState | None"]


class Publication:
    """One run's publication of one claimed version. Pickles as plain settings."""

    def __init__(self, registry: "Registry", model: str, version: str, run_id: str, claim: bytes) -> None:
        self.registry = registry
        self.model = model
        self.version = version
        self.run_id = run_id
        self._claim = claim
        self._files: dict[str, dict[str, Any]] = {}
        self._state = "open"

    @property
    def url(self) -> str:
        """URL of the version folder."""
        return self.registry.version_url(self.model, self.version)

    @property
    def state(self) -> str:
        """``open``, ``committed`` or ``aborted``."""
        return self._state

    def writer(
        self,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        *,
        part: str = MODEL_PART,
        part_size: int = DEFAULT_PART_BYTES,
    ) -> ShardedWriter:
        """Return a ShardedWriter for one part (``model`` or ``optimizer``) of this version.

        Shards are named ``<part>-00001-of-0000N.safetensors``. Call ``write_shard`` on
        it from any process; do not call its ``write_index``, because commit writes the
        index files.
        """
        if part not in PARTS:
            raise ValueError(f"part {part!r} is invalid; expected one of {PARTS}")
        self._require_open("create a writer")
        return ShardedWriter(
            self.url,
            self.registry.storage_options,
            max_shard_bytes=max_shard_bytes,
            part_size=part_size,
            prefix=part,
        )

    def add_file(self, name: str, data: bytes) -> dict[str, Any]:
        """Write an extra file (for example ``config.json``) into the version, create-only.

        Returns its manifest entry ``{"size", "sha256"}``. Call it in the process that
        commits, because commit lists only the files added through this object.
        """
        self._require_open("add a file")
        validate_extra_file(name)
        data = bytes(data)
        store, layout = self.registry.store, self.registry.layout
        store.create(layout.file(self.model, self.version, name), data)
        entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self._files[name] = entry
        logger.info("added file %s to version %s of model %r (%d bytes)", name, self.version, self.model, len(data))
        return entry

    def commit(
        self,
        fields: Mapping[str, Any],
        plan: Sequence[ShardPlan],
        records: Sequence[ShardRecord],
        *,
        optimizer_plan: Sequence[ShardPlan] | None = None,
        optimizer_records: Sequence[ShardRecord] | None = None,
        tags: TagRequest = (),
    ) -> ModelVersion:
        """Write the index files and the manifest, then move ``tags``; return the published version.

        ``fields`` contains ``model_spec`` and ``feature_schema``, and optionally
        ``parents``, ``plan`` (``{"sha256", "options", "actions"}``) and ``verification``
        (``{"passed": true, ...}``). ``tags`` is a list of tag names, each moved from
        whatever it names at commit time. It can also map each tag name to the TagState
        that the caller read earlier (None: the tag must not exist yet). Then a move
        fails if the tag changed since.

        Raises ValueError (records or plan wrong), ManifestError (fields invalid or a
        failed verification), ClaimLostError, or VersionExistsError before the manifest
        is written; the caller then calls :meth:`abort`. Raises TagConflictError after
        the manifest is written, when a tag changed: the version is published then,
        and the message lists the tags that did not move.
        """
        self._require_open("commit")
        where = f"version {self.version} of model {self.model!r} ({self.url})"
        moves = self._tag_requests(tags)
        normalised = publisher_fields(fields, model=self.model, version=self.version)
        verification = normalised["verification"]
        if isinstance(verification, dict) and verification.get("passed") is False:
            raise ManifestError(
                f"{where}: verification failed ({verification}); a version that fails "
                "verification is not published. Abort the publication and fix the plan"
            )
        if (optimizer_plan is None) != (optimizer_records is None):
            raise ValueError(f"{where}: pass optimizer_plan and optimizer_records together, or neither")
        self._check_claim()

        parts: list[tuple[str, Sequence[ShardPlan], Sequence[ShardRecord]]] = [(MODEL_PART, plan, records)]
        if optimizer_plan is not None and optimizer_records is not None:
            parts.append((OPTIMIZER_PART, optimizer_plan, optimizer_records))
        shards: dict[str, dict[str, Any]] = {}
        files = dict(self._files)
        indexes: dict[str, dict[str, dict[str, Any]]] = {}
        for part, part_plan, part_records in parts:
            check_records(part, part_plan, part_records, where=where)
            files[index_name(part)] = self._write_index(part, part_plan)
            indexes[part] = tensor_index(part_plan)
            for record in part_records:
                shards[record.file] = record.to_json()
            self._check_headers(part, indexes[part], shards, where)
        self._check_folder(set(shards) | set(files), where)

        store, layout = self.registry.store, self.registry.layout
        store.flush([layout.file(self.model, self.version, name) for name in [*shards, *files]])
        document = build_document(
            model=self.model,
            version=self.version,
            run_id=self.run_id,
            fields=normalised,
            shards=shards,
            files=files,
            tensors=indexes[MODEL_PART],
            optimizer_tensors=indexes.get(OPTIMIZER_PART, {}),
        )
        manifest_path = layout.manifest(self.model, self.version)
        validate_document(document, url=store.url(manifest_path), model=self.model, version=self.version)
        data = encode(document)
        self._check_claim()
        try:
            store.create(manifest_path, data)
        except ObjectExistsError as e:
            raise VersionExistsError(claims.describe_taken(store, layout, self.model, self.version)) from e
        self._state = "committed"
        manifest = Manifest(document=document, data=data, sha256=hashlib.sha256(data).hexdigest(), url=store.url(manifest_path))
        logger.info("published version %s of model %r (%d shards, manifest %s)", self.version, self.model, len(shards), manifest.url)
        published = ModelVersion(self.registry, manifest)
        self._move_tags(moves, where)
        return published

    def abort(self) -> None:
        """Remove every file this run wrote under the version, then the claim.

        Does nothing after an earlier abort. Raises PublicationStateError after commit.
        When the claim is no longer this run's (gc removed it and another run claimed
        the version), removes nothing and logs an error.
        """
        if self._state == "aborted":
            return
        if self._state == "committed":
            raise PublicationStateError(
                f"version {self.version} of model {self.model!r} is published; abort cannot "
                "remove a published version"
            )
        store, layout = self.registry.store, self.registry.layout
        if store.exists(layout.manifest(self.model, self.version)):
            self._state = "committed"
            raise PublicationStateError(
                f"version {self.version} of model {self.model!r} has a manifest, so it is "
                "published; abort leaves it in place"
            )
        try:
            self._check_claim()
        except ClaimLostError as e:
            self._state = "aborted"
            logger.error("not removing the files of version %s of model %r: %s", self.version, self.model, e)
            return
        folder = layout.version(self.model, self.version)
        claim_path = layout.claim(self.model, self.version)
        removed = 0
        for stored in store.walk(folder):
            if stored.path != claim_path:
                store.remove(stored.path)
                removed += 1
        store.remove(claim_path)
        store.remove_empty_dirs(folder)
        self._state = "aborted"
        logger.info("aborted version %s of model %r: removed %d files and the claim", self.version, self.model, removed)

    def __enter__(self) -> "Publication":
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if self._state != "open":
            return
        if exc_type is None:
            logger.warning(
                "publication of version %s of model %r ended without commit; aborting it",
                self.version, self.model,
            )
            self.abort()
            return
        try:
            self.abort()
        except Exception:
            # The caller needs the original error; gc removes what abort could not.
            logger.exception(
                "abort of version %s of model %r failed; gc removes its files after the grace period",
                self.version, self.model,
            )

    def __repr__(self) -> str:
        return f"Publication({self.url!r}, run_id={self.run_id!r}, state={self._state!r})"

    # -- helpers ------------------------------------------------------------------

    def _require_open(self, action: str) -> None:
        if self._state != "open":
            raise PublicationStateError(
                f"cannot {action}: the publication of version {self.version} of model "
                f"{self.model!r} is {self._state}"
            )

    def _check_claim(self) -> None:
        store, layout = self.registry.store, self.registry.layout
        found = claims.read_claim(store, layout, self.model, self.version)
        if found is None or found[1] != self._claim:
            owner = f"it now belongs to {found[0].describe()}" if found is not None else "it was removed"
            raise ClaimLostError(
                f"the claim of version {self.version} of model {self.model!r} "
                f"({store.url(layout.claim(self.model, self.version))}) is no longer held by run "
                f"{self.run_id!r}: {owner}. gc removes claims older than its grace period, so "
                "use a grace period longer than the longest publication, and publish again"
            )

    def _write_index(self, part: str, plan: Sequence[ShardPlan]) -> dict[str, Any]:
        data = index_bytes(plan)
        store, layout = self.registry.store, self.registry.layout
        path = layout.file(self.model, self.version, index_name(part))
        try:
            store.create(path, data)
        except ObjectExistsError:
            # A retried commit finds its own index; any other content is an error.
            if store.read(path) != data:
                raise
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def _check_headers(
        self, part: str, expected: dict[str, dict[str, Any]], shards: dict[str, dict[str, Any]], where: str
    ) -> None:
        """Read every shard header of a part and compare it with the plan; sizes with the records."""
        index_url = f"{self.url}/{index_name(part)}"
        digests = {entry["shard"]: shards[entry["shard"]] for entry in expected.values()}
        reader = SafetensorsReader(index_url, self.registry.storage_options, digests=digests)
        problems = index_problems(expected, dict(reader.tensors))
        if problems:
            raise ValueError(f"{where}: the written {part} shards differ from the plan: " + "; ".join(problems))

    def _check_folder(self, expected: set[str], where: str) -> None:
        """Remove temporary files of dead shard writers, and reject files this publication did not record."""
        store, layout = self.registry.store, self.registry.layout
        folder = layout.version(self.model, self.version)
        unexpected = []
        for stored in store.walk(folder):
            name = stored.path[len(folder.rstrip("/")) + 1 :]
            if name in expected or name == CLAIM_NAME:
                continue
            if name.startswith(".") and name.endswith(".partial") and "/" not in name:
                # LocalSink's temporary file, left by a shard task that died mid-write.
                store.remove(stored.path)
                logger.info("removed temporary file %s of a dead shard writer", store.url(stored.path))
                continue
            unexpected.append(name)
        if unexpected:
            raise ValueError(
                f"{where}: the version folder contains files that were not written through "
                f"this publication: {sorted(unexpected)}. Abort the publication; write shards "
                "with publication.writer() and other files with publication.add_file()"
            )

    def _tag_requests(self, tags: TagRequest) -> list[tuple[str, Any]]:
        if isinstance(tags, str):
            raise TypeError(f"tags is the string {tags!r}; pass a list of tag names, for example [{tags!r}]")
        if isinstance(tags, Mapping):
            requests = [(validate_tag(tag), expected) for tag, expected in tags.items()]
        else:
            requests = [(validate_tag(tag), _READ_AT_COMMIT) for tag in tags]
        for tag, _ in requests:
            self.registry.check_tag_name_free(self.model, tag)
        return requests

    def _move_tags(self, moves: list[tuple[str, Any]], where: str) -> None:
        failures = []
        moved = []
        store, layout = self.registry.store, self.registry.layout
        for tag, expected in moves:
            try:
                if expected is _READ_AT_COMMIT:
                    expected = refs.read_tag(store, layout, self.model, tag)
                refs.move_tag(store, layout, self.model, tag, self.version, expected)
                moved.append(tag)
            except TagConflictError as e:
                failures.append(str(e))
        if failures:
            raise TagConflictError(
                f"{where} is published, but {len(failures)} of {len(moves)} tags did not move "
                f"(moved: {moved or 'none'}): " + " | ".join(failures) + ". Move them with "
                "`surgery registry tag`"
            )


# Marks a tag whose current state is read just before it is moved.
_READ_AT_COMMIT = object()
