"""Embedded mode (SQLite): the active-jobs quota holds under concurrent submissions. Eight threads, each on its
own connection, count and insert at once with a limit of 3; the owner's write lock must make them take turns."""

from __future__ import annotations

import threading
import time
import uuid

from app.api.quotas import Quotas, QuotaExceeded
from app.core.db import session_factory, upgrade_database
from app.core.models import Artifact, Job, Owner, utcnow
from app.core.settings import Settings

LIMIT, THREADS = 3, 8


def test_concurrent_submissions_cannot_exceed_the_active_limit(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'nba.db'}"
    upgrade_database(url)
    sessions = session_factory(url)
    with sessions() as s:
        owner = Owner(name="race", created_at=utcnow())
        s.add(owner)
        s.flush()
        art = Artifact(owner_id=owner.id, kind="model", sha256="0" * 64, size_bytes=1, storage_key="k", format="npz")
        s.add(art)
        s.commit()
        owner_id, art_id = owner.id, art.id
    quotas = Quotas(Settings(data_dir=str(tmp_path / "data"), database_url=url, quota_active_jobs=LIMIT,
                             quota_jobs_per_minute=0))
    barrier = threading.Barrier(THREADS)
    outcomes: list[str] = []

    def submit() -> None:
        with sessions() as s:
            barrier.wait()
            try:
                quotas.lock_owner(s, owner_id)
                quotas.check_active_jobs(s, owner_id)
                time.sleep(0.05)  # widen the window between the count and the insert
                s.add(Job(id=str(uuid.uuid4()), owner_id=owner_id, model_id=art_id, dataset_id=art_id, method="ft"))
                s.commit()
                outcomes.append("admitted")
            except QuotaExceeded:
                s.rollback()
                outcomes.append("refused")

    threads = [threading.Thread(target=submit) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["admitted"] * LIMIT + ["refused"] * (THREADS - LIMIT)
    with sessions() as s:
        assert s.query(Job).filter(Job.owner_id == owner_id).count() == LIMIT
