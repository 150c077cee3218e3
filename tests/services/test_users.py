"""API users and tokens in the store (services.db.users), on both dialects at the Alembic head."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from services.db import store, users
from services.db.models import ApiToken
from services.db.session import make_engine, session_scope


def test_tokens_are_stored_hashed_authenticate_and_revoke(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    try:
        with session_scope(engine) as s:
            alice = users.add_user(s, "alice")
            users.add_user(s, "ops", is_admin=True)
            new = users.create_token(s, "alice")
            admin = users.create_token(s, "ops", "admin")
        with session_scope(engine) as s:
            stored = s.scalars(select(ApiToken.token_hash)).all()
        assert new.secret not in stored and users.hash_token(new.secret) in stored  # never the token itself
        with session_scope(engine) as s:
            who = users.authenticate(s, new.secret)
            assert who == users.Principal(alice.id, "alice", new.info.id, "submit") and not who.is_admin
            assert users.authenticate(s, admin.secret).is_admin
            assert users.authenticate(s, new.secret + "x") is None and users.authenticate(s, "") is None
        with session_scope(engine) as s:
            assert users.list_tokens(s, "alice")[0].last_used_at is not None
            users.revoke_token(s, new.info.id)
            first = users.revoke_token(s, new.info.id).revoked_at  # idempotent
        with session_scope(engine) as s:
            assert users.authenticate(s, new.secret) is None
            assert users.list_tokens(s, "alice")[0].revoked_at == first
            with pytest.raises(store.NotFound):
                users.revoke_token(s, 999)
    finally:
        engine.dispose()


def test_bad_names_duplicates_and_scopes_are_refused(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    try:
        with session_scope(engine) as s:
            users.add_user(s, "bob")
            with pytest.raises(users.UserError, match="already exists"):
                users.add_user(s, "bob")
            for bad in ("", "has space", "x" * 201, "-dash", "nul\x00", "newline\n"):
                with pytest.raises(users.UserError, match="user name"):
                    users.add_user(s, bad)
            with pytest.raises(users.UserError, match="not an admin"):
                users.create_token(s, "bob", "admin")
            with pytest.raises(users.UserError, match="scope 'root'"):
                users.create_token(s, "bob", "root")
            with pytest.raises(store.NotFound, match="tad users add nobody"):
                users.create_token(s, "nobody")
            assert [u.name for u in users.list_users(s)] == ["bob"] and users.list_tokens(s) == []
    finally:
        engine.dispose()
