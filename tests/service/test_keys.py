"""API keys: only hashes stored, verification, revocation by prefix/id/full key, listing."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select

from app.core import keys
from app.core.models import ApiKey
from nba_core.errors import NBAError


def test_create_verify_revoke(sessions) -> None:
    with sessions() as s:
        plaintext = keys.create_key(s, "keys-owner-a")
        s.commit()
    assert plaintext.startswith("nba_") and len(plaintext) == 44
    with sessions() as s:
        row = s.execute(select(ApiKey).where(ApiKey.prefix == plaintext[:12])).scalar_one()
        # Only the hash is stored, never the key.
        assert row.key_hash == hashlib.sha256(plaintext.encode()).hexdigest()
        assert plaintext not in (row.key_hash, row.prefix)
        owner = keys.verify_key(s, plaintext)
        assert owner is not None and owner.name == "keys-owner-a"
        s.commit()
        assert s.get(ApiKey, row.id).last_used_at is not None
        assert keys.verify_key(s, plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")) is None
        assert keys.verify_key(s, "") is None and keys.verify_key(s, None) is None
        assert keys.verify_key(s, "Bearer nonsense") is None
        with pytest.raises(NBAError) as err:
            keys.require_owner(s, "nba_wrong")
        assert err.value.code == "unauthorized" and err.value.http_status == 401

    with sessions() as s:
        assert keys.revoke_key(s, plaintext[:12]) == 1
        s.commit()
    with sessions() as s:
        assert keys.verify_key(s, plaintext) is None
        assert keys.revoke_key(s, plaintext[:12]) == 0  # already revoked


def test_owner_reused_and_keys_listed_and_revoked_by_id_or_key(sessions) -> None:
    with sessions() as s:
        k1 = keys.create_key(s, "keys-owner-b")
        k2 = keys.create_key(s, "keys-owner-b")
        s.commit()
    with sessions() as s:
        listed = keys.list_keys(s, "keys-owner-b")
        assert len(listed) == 2 and {k.owner_id for k in listed} == {listed[0].owner_id}
        assert {k.prefix for k in listed} == {k1[:12], k2[:12]}
        assert keys.revoke_key(s, k2) == 1  # by the full plaintext
        assert keys.revoke_key(s, next(k.id for k in listed if k.prefix == k1[:12])) == 1  # by id
        s.commit()
    with sessions() as s:
        assert all(k.revoked_at is not None for k in keys.list_keys(s, "keys-owner-b"))
        assert keys.verify_key(s, k1) is None and keys.verify_key(s, k2) is None


def test_empty_owner_rejected(sessions) -> None:
    with sessions() as s, pytest.raises(NBAError):
        keys.create_key(s, "   ")
