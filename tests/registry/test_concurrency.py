"""Races: tag compare-and-swap between threads, and two processes publishing the same version."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterator

import pytest

from pipeline.registry import Registry, TagConflictError
from pipeline.registry.refs import TagState

from tests.registry.helpers import publish, publish_in_child, trained_policy, warm_up
from tests.storage.conftest import Backend

ROUNDS = 5


def race(*calls: Any) -> list[tuple[str, Any]]:
    """Run each call on its own thread, released together by a barrier; return (outcome, value) per call."""
    barrier = threading.Barrier(len(calls))
    results: list[tuple[str, Any]] = [("missing", None)] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = ("ok", calls[index]())
        except Exception as e:  # noqa: BLE001  (the outcome is what the test checks)
            results[index] = ("error", e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_tag_cas_one_winner(backend: Backend) -> None:
    # NOTE: moto 5.2's server checks If-Match and then writes, without a lock, so on s3 this
    # race could in principle let both writers win. 300 rounds of the same race against
    # moto on a 2-core machine each had exactly one winner.
    registry = Registry(backend.root, backend.storage_options)
    for seed in range(3):
        publish(registry, "policy", trained_policy(seed))
    registry.move_tag("policy", "latest", "1", expected=None)

    for round_number in range(ROUNDS):
        state = registry.read_tag("policy", "latest")
        assert state is not None
        results = race(
            lambda: registry.move_tag("policy", "latest", "2", expected=state),
            lambda: registry.move_tag("policy", "latest", "3", expected=state),
        )
        winners = [value for outcome, value in results if outcome == "ok"]
        losers = [value for outcome, value in results if outcome == "error"]
        assert len(winners) == 1, f"round {round_number}: {results}"
        assert len(losers) == 1 and isinstance(losers[0], TagConflictError), f"round {round_number}: {results}"
        assert str(losers[0]).startswith("tag 'latest' of model 'policy' ")
        assert registry.read_tag("policy", "latest").version == winners[0].version


def test_tag_create_one_winner(backend: Backend) -> None:
    registry = Registry(backend.root, backend.storage_options)
    publish(registry, "policy", trained_policy(0))
    publish(registry, "policy", trained_policy(1))
    results = race(
        lambda: registry.move_tag("policy", "prod", "1", expected=None),
        lambda: registry.move_tag("policy", "prod", "2", expected=None),
    )
    assert sorted(outcome for outcome, _ in results) == ["error", "ok"], results


def test_tag_cas_stale_state_message(backend: Backend) -> None:
    registry = Registry(backend.root, backend.storage_options)
    for seed in range(3):
        publish(registry, "policy", trained_policy(seed))
    first = registry.move_tag("policy", "latest", "1", expected=None)
    registry.move_tag("policy", "latest", "2", expected=first)
    with pytest.raises(
        TagConflictError,
        match=r"^tag 'latest' of model 'policy' changed since it was read: expected version 1, found version 2\. ",
    ):
        registry.move_tag("policy", "latest", "3", expected=first)
    with pytest.raises(TagConflictError, match=r"expected no tag, found version 2"):
        registry.move_tag("policy", "latest", "3", expected=None)
    missing_tag_state = TagState(tag="beta", version="1", updated_at="", etag=first.etag)
    with pytest.raises(TagConflictError, match=r"expected version 1, found no tag"):
        registry.move_tag("policy", "beta", "3", expected=missing_tag_state)
    assert registry.read_tag("policy", "latest").version == "2"


@pytest.mark.parametrize("backend", ["file"], indirect=True)
def test_tag_lock_left_by_dead_writer(backend: Backend) -> None:
    registry = Registry(backend.root, backend.storage_options)
    publish(registry, "policy", trained_policy(0), tags=["latest"])
    backend.put("policy/refs/latest.lock", b"")
    with pytest.raises(
        TagConflictError,
        match=r"^tag 'latest' of model 'policy' is being moved by another writer \(lock file file://.*/policy/refs/latest.lock exists\)",
    ):
        registry.move_tag("policy", "latest", "1")
    assert list(registry.tags("policy")) == ["latest"]


@pytest.fixture(scope="module")
def spawn_pool() -> Iterator[ProcessPoolExecutor]:
    """Two spawned worker processes with torch and the registry imported."""
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(warm_up, range(2)))
        yield pool


@pytest.mark.parametrize("backend", ["file", "s3"], indirect=True)
def test_concurrent_publish_one_winner(backend: Backend, spawn_pool: ProcessPoolExecutor) -> None:
    registry = Registry(backend.root, backend.storage_options)
    start_at = time.time() + 1.0
    runs = [f"run-{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
    futures = [
        spawn_pool.submit(publish_in_child, backend.root, backend.storage_options, "policy", "7", start_at, run)
        for run in runs
    ]
    results = [future.result(timeout=120) for future in futures]

    outcomes = sorted(outcome for outcome, _ in results)
    assert outcomes == ["lost", "won"], results
    winner = runs[[outcome for outcome, _ in results].index("won")]
    loser_message = next(message for outcome, message in results if outcome == "lost")
    assert loser_message.startswith("VersionExistsError: version 7 of model 'policy' "), loser_message
    manifest = registry.resolve("policy", "7").manifest
    assert manifest.document["run_id"] == winner
    assert registry.versions("policy") == ["7"]

    # Both runs ask for 'next' at once: each gets its own version.
    start_at = time.time() + 1.0
    futures = [
        spawn_pool.submit(publish_in_child, backend.root, backend.storage_options, "policy", "next", start_at, run)
        for run in runs
    ]
    results = [future.result(timeout=120) for future in futures]
    assert sorted(results) == [("won", "8"), ("won", "9")], results
    assert registry.versions("policy") == ["7", "8", "9"]
