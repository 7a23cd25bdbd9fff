"""Status polls from memory (app/api/poll_cache.py): hits need no SQL, and every change that Postgres commits, by
the worker, the API or anyone else, reaches the poller within moments; with the LISTEN connection gone, polls go
to Postgres again and stay correct."""

from __future__ import annotations

import time

import httpx
import psycopg
import pytest
from sqlalchemy import update

from app.api.poll_cache import APPLICATION_NAME, CHANNEL, PollCache
from app.core import keys
from app.core.models import Job

from .conftest import PG_ADMIN, wait_for

FRESH_WITHIN_S = 2.0


# ------------------------------------------------------------------------------------------ the cache alone

def _filled(cache: PollCache, job: str = "j1", owner: str = "o1", body: bytes = b"{}") -> bool:
    return cache.store(cache.ticket(), "digest", "k1", owner, job, body)


def test_cache_serves_only_while_live_and_only_to_the_owner() -> None:
    cache = PollCache(key_ttl_s=60)
    assert not _filled(cache) and cache.lookup("digest", "j1") is None  # not live: nothing stored
    cache.set_live(True)
    assert _filled(cache, body=b'{"a":1}')
    assert cache.lookup("digest", "j1") == b'{"a":1}' and cache.hits == 1
    assert cache.lookup("other-digest", "j1") is None
    cache.store(cache.ticket(), "digest2", "k2", "o2", "j2", b"{}")
    assert cache.lookup("digest2", "j1") is None  # o2's key never sees o1's job
    cache.set_live(False)
    assert cache.lookup("digest", "j1") is None


def test_a_change_during_the_read_refuses_the_fill() -> None:
    cache = PollCache(key_ttl_s=60)
    cache.set_live(True)
    ticket = cache.ticket()  # the read from Postgres starts ...
    cache.changed("jobs:j1")  # ... the worker commits meanwhile ...
    assert not cache.store(ticket, "digest", "k1", "o1", "j1", b"old")  # ... so the old row is not kept
    assert cache.store(ticket, "digest", "k1", "o1", "j2", b"{}")  # other jobs are unaffected
    assert _filled(cache, body=b"new") and cache.lookup("digest", "j1") == b"new"
    cache.changed("jobs:j1")
    assert cache.lookup("digest", "j1") is None


def test_a_key_revoked_during_the_read_is_not_kept() -> None:
    cache = PollCache(key_ttl_s=60)
    cache.set_live(True)
    ticket = cache.ticket()
    cache.changed("api_keys:k1")
    assert not cache.store(ticket, "digest", "k1", "o1", "j1", b"{}")
    assert cache.lookup("digest", "j1") is None


def test_key_changes_and_artifact_changes_drop_entries() -> None:
    cache = PollCache(key_ttl_s=60)
    cache.set_live(True)
    assert _filled(cache)
    cache.changed("api_keys:k1")  # revoked (or touched): the next poll checks the key in Postgres
    assert cache.lookup("digest", "j1") is None
    assert _filled(cache)
    cache.changed("artifacts:a1")
    assert cache.lookup("digest", "j1") is None


def test_sizes_and_ages_are_bounded() -> None:
    cache = PollCache(key_ttl_s=60, job_ttl_s=0.05, max_jobs=3, max_keys=3)
    cache.set_live(True)
    for i in range(10):
        assert cache.store(cache.ticket(), "digest", "k1", "o1", f"j{i}", b"{}")
        cache.changed(f"jobs:x{i}")
    assert len(cache._jobs) == 3 and len(cache._changed) <= 12
    assert cache.lookup("digest", "j9") == b"{}" and cache.lookup("digest", "j0") is None
    time.sleep(0.06)
    assert cache.lookup("digest", "j9") is None  # aged out


def test_a_forgotten_change_still_refuses_old_fills() -> None:
    cache = PollCache(key_ttl_s=60, max_jobs=1)  # remembers the last 4 changed jobs
    cache.set_live(True)
    ticket = cache.ticket()
    for i in range(10):
        cache.changed(f"jobs:j{i}")
    assert not cache.store(ticket, "digest", "k1", "o1", "j0", b"old")


# --------------------------------------------------------------------------------- the cache in the server

def _process(server) -> dict:
    return httpx.get(f"{server.url}/v1/_debug/process").json()


def _wait(predicate, within: float = FRESH_WITHIN_S):
    return wait_for(predicate, within, interval=0.01, what="the change to reach the poll")


@pytest.fixture()
def job_id(http, uploaded, db) -> str:
    ident = http.post("/v1/jobs", json={"method": "ft", "model_id": uploaded["model"]["id"],
                                        "dataset_id": uploaded["dataset"]["id"], "params": {"epochs": 1}}).json()["id"]
    db.execute(update(Job).where(Job.id == ident).values(status="queued", progress=0.0))  # no worker touches it
    db.commit()
    return ident


def test_the_migration_notifies_on_job_updates(pg_url, db, job_id) -> None:
    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN.rsplit("/", 1)[0] + "/" + name, autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        db.execute(update(Job).where(Job.id == job_id).values(progress=0.25))
        db.commit()
        payloads = [n.payload for n in conn.notifies(timeout=2.0, stop_after=1)]
    assert payloads == [f"jobs:{job_id}"]


def test_repeated_polls_are_hits_and_changes_show_at_once(api_server, http, db, job_id) -> None:
    assert _wait(lambda: _process(api_server)["poll_cache"]["live"])
    first = http.get(f"/v1/jobs/{job_id}").json()
    hits = _process(api_server)["poll_cache"]["hits"]
    for _ in range(5):
        assert http.get(f"/v1/jobs/{job_id}").json() == first
    assert _process(api_server)["poll_cache"]["hits"] >= hits + 5

    # A change committed elsewhere (as the worker does) reaches the poller, and the old answer never returns.
    db.execute(update(Job).where(Job.id == job_id).values(status="running", progress=0.5, attempts=1))
    db.commit()
    t0 = time.monotonic()
    assert _wait(lambda: http.get(f"/v1/jobs/{job_id}").json()["progress"] == 0.5)
    print(f"change visible after {1000 * (time.monotonic() - t0):.1f} ms")
    assert all(http.get(f"/v1/jobs/{job_id}").json()["progress"] == 0.5 for _ in range(20))

    # The API's own write (cancel) is visible to the very next poll.
    assert http.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    assert http.get(f"/v1/jobs/{job_id}").json()["cancel_requested"] is True


def test_another_owner_and_a_revoked_key_get_no_cached_answer(api_server, http, job_id, second_owner_key,
                                                              sessions) -> None:
    assert _wait(lambda: _process(api_server)["poll_cache"]["live"])
    assert http.get(f"/v1/jobs/{job_id}").status_code == 200
    other = httpx.get(f"{api_server.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {second_owner_key}"})
    assert other.status_code == 404

    # The test owner's key, polled (and so cached), then revoked: refused within moments.
    token = http.headers["Authorization"].split(" ", 1)[1]
    assert http.get(f"/v1/jobs/{job_id}").status_code == 200
    with sessions() as s:
        keys.revoke_key(s, token[:keys.PREFIX_LEN])
        s.commit()
    assert _wait(lambda: http.get(f"/v1/jobs/{job_id}").status_code == 401)


def test_polls_stay_correct_while_the_listener_is_down(api_server, pg_url, http, db, job_id) -> None:
    assert _wait(lambda: _process(api_server)["poll_cache"]["live"])
    http.get(f"/v1/jobs/{job_id}")
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = %s AND datname = %s",
                               (APPLICATION_NAME, pg_url.rsplit("/", 1)[1])).fetchall()
    assert killed
    assert _wait(lambda: not _process(api_server)["poll_cache"]["live"])
    for progress in (0.1, 0.2, 0.3):  # no cache, no notifications: every poll reads Postgres
        db.execute(update(Job).where(Job.id == job_id).values(progress=progress))
        db.commit()
        assert http.get(f"/v1/jobs/{job_id}").json()["progress"] == progress
    assert _wait(lambda: _process(api_server)["poll_cache"]["live"], within=10.0)  # reconnected
    http.get(f"/v1/jobs/{job_id}")
    db.execute(update(Job).where(Job.id == job_id).values(progress=0.9))
    db.commit()
    assert _wait(lambda: http.get(f"/v1/jobs/{job_id}").json()["progress"] == 0.9)
