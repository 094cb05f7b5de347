"""Version claims: the create-only ``<version>/.claim`` object that reserves a version id.

A run claims its version before it writes anything, so of two runs that want the same
version the loser fails at once, before any heavy work, and shard names can stay
deterministic. The claim records the run id, host, process id, time and a random
nonce. It stays in place after publication as the record of the run that published.
A claim without a manifest belongs to a publication in progress or to one that died.
gc removes it, with the files next to it, once it is older than the grace period.

``next`` allocation: 1 + the highest integer version id whose folder contains anything
(a manifest, a claim, or files left over from a failed cleanup), so an id is never
reused while something remains under it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from dataclasses import asdict, dataclass

from pipeline.registry.errors import RegistryFormatError, VersionExistsError
from pipeline.registry.layout import REFS_DIR, Layout, integer_version
from pipeline.registry.manifest import tool_version, utc_now
from pipeline.registry.store import ObjectStore
from pipeline.storage.errors import ObjectExistsError

logger = logging.getLogger(__name__)

CLAIM_FORMAT = 1


@dataclass(frozen=True)
class Claim:
    """Claim record: the run, host and process that claimed a version, and the time."""

    model: str
    version: str
    run_id: str
    host: str
    pid: int
    created_at: str
    tool_version: str
    nonce: str
    claim_format: int = CLAIM_FORMAT

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode("utf-8") + b"\n"

    def describe(self) -> str:
        return f"run {self.run_id!r} on host {self.host!r} (pid {self.pid}) at {self.created_at}"


def new_claim(model: str, version: str, run_id: str) -> Claim:
    return Claim(
        model=model,
        version=version,
        run_id=run_id,
        host=socket.gethostname(),
        pid=os.getpid(),
        created_at=utc_now(),
        tool_version=tool_version(),
        nonce=uuid.uuid4().hex,
    )


def decode_claim(data: bytes, *, url: str) -> Claim:
    try:
        document = json.loads(data.decode("utf-8"))
        return Claim(**document)
    except (UnicodeDecodeError, ValueError, TypeError) as e:
        raise RegistryFormatError(
            f"{url}: invalid claim object ({e}); it was not written by this tool. Remove it if "
            "no run is publishing this version"
        ) from e


def read_claim(store: ObjectStore, layout: Layout, model: str, version: str) -> tuple[Claim, bytes] | None:
    """Return the claim of a version and its exact bytes, or None when there is none."""
    path = layout.claim(model, version)
    try:
        data = store.read(path)
    except FileNotFoundError:
        return None
    return decode_claim(data, url=store.url(path)), data


def create_claim(store: ObjectStore, layout: Layout, model: str, version: str, run_id: str) -> bytes:
    """Claim ``version`` for ``run_id`` and return the claim's bytes.

    Raises VersionExistsError, naming the version and its current owner, when the
    version is published or claimed already.
    """
    claim = new_claim(model, version, run_id)
    data = claim.encode()
    path = layout.claim(model, version)
    try:
        store.create(path, data)
    except ObjectExistsError as e:
        raise VersionExistsError(describe_taken(store, layout, model, version)) from e
    logger.info("claimed version %s of model %r for run %r (%s)", version, model, run_id, store.url(path))
    return data


def describe_taken(store: ObjectStore, layout: Layout, model: str, version: str) -> str:
    """Return the error message that explains why ``version`` cannot be published again."""
    subject = f"version {version} of model {model!r}"
    if store.exists(layout.manifest(model, version)):
        return (
            f"{subject} already exists ({store.url(layout.manifest(model, version))}); published "
            "versions are never overwritten. Publish with version 'next' or pick another version id"
        )
    try:
        found = read_claim(store, layout, model, version)
    except RegistryFormatError as e:
        return f"{subject} is claimed, but its claim is unreadable: {e}"
    if found is None:
        return f"{subject} is being claimed by another run; publish with version 'next' or pick another version id"
    claim, _ = found
    return (
        f"{subject} is claimed by {claim.describe()} and has no manifest yet: that run is "
        "publishing it or died while doing so. Publish with version 'next' or pick another "
        "version id; `surgery registry gc` removes a dead run's claim after the grace period"
    )


def used_integer_versions(store: ObjectStore, layout: Layout, model: str) -> list[int]:
    """Return the integer version ids of ``model`` whose folder contains any object."""
    model_path = layout.model(model)
    used = set()
    for stored in store.walk(model_path):
        relative = stored.path[len(model_path.rstrip("/")) + 1 :]
        folder = relative.split("/", 1)[0]
        if folder == REFS_DIR or "/" not in relative:
            continue
        number = integer_version(folder)
        if number is not None:
            used.add(number)
    return sorted(used)


def next_version(store: ObjectStore, layout: Layout, model: str) -> str:
    used = used_integer_versions(store, layout, model)
    return str(used[-1] + 1 if used else 1)
