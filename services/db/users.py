"""Store functions for API users and their bearer tokens (the HTTP API's identities).

Like `services.db.store`, every function takes a Session, returns plain frozen dataclasses and never commits.
A token is shown once when it is created and only its sha256 is stored, so a leaked table or backup grants
nothing; revoking sets `revoked_at` (the row stays, for the audit trail).
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.db.models import TOKEN_SCOPES, ApiToken, Job, User, utcnow
from services.db.store import NotFound

TOKEN_PREFIX = "tad_"
# last_used_at is refreshed at most this often per token: a busy CI token must not turn every read into a write.
LAST_USED_GRANULARITY = timedelta(seconds=60)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,199}$")


class UserError(ValueError):
    """A user or token request that cannot be honoured (bad name, duplicate, wrong scope); the message says why."""


@dataclass(frozen=True)
class UserInfo:
    id: int
    name: str
    is_admin: bool
    created_at: datetime


@dataclass(frozen=True)
class TokenInfo:
    id: int
    user_id: int
    user: str
    scope: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class NewToken:
    """A freshly created token: `secret` is the only copy of the token there will ever be."""

    info: TokenInfo
    secret: str


@dataclass(frozen=True)
class Principal:
    """Who is calling the API: the user behind a valid, unrevoked token and that token's scope."""

    user_id: int
    user: str
    token_id: int
    scope: str

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


def hash_token(token: str) -> str:
    """The stored form of a token (sha256 hex): tokens are long random strings, so no salt or slow hash is
    needed to make the stored value useless to a thief."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _user_info(u: User) -> UserInfo:
    return UserInfo(u.id, u.name, bool(u.is_admin), u.created_at)


def _token_info(t: ApiToken, user: str) -> TokenInfo:
    return TokenInfo(t.id, t.user_id, user, t.scope, t.created_at, t.revoked_at, t.last_used_at)


def add_user(session: Session, name: str, is_admin: bool = False) -> UserInfo:
    """Create a user; UserError when the name is malformed or taken."""
    if not _NAME.fullmatch(name or ""):
        raise UserError(f"user name {name!r}: use 1-200 letters, digits, '.', '_', '@' or '-', starting with a "
                        "letter or digit")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise UserError(f"user {name!r} already exists")
    user = User(name=name, is_admin=is_admin)
    session.add(user)
    session.flush()
    return _user_info(user)


def get_user(session: Session, name: str) -> UserInfo:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"user {name!r} does not exist (tad users add {name})")
    return _user_info(user)


def list_users(session: Session) -> list[UserInfo]:
    return [_user_info(u) for u in session.scalars(select(User).order_by(User.name))]


def create_token(session: Session, user_name: str, scope: str = "submit") -> NewToken:
    """A new random token for `user_name`. An admin-scoped token needs an admin user, so that the scope of a
    token never grants more than its owner has."""
    if scope not in TOKEN_SCOPES:
        raise UserError(f"scope {scope!r}: choose one of {', '.join(TOKEN_SCOPES)}")
    user = get_user(session, user_name)
    if scope == "admin" and not user.is_admin:
        raise UserError(f"user {user_name!r} is not an admin; an admin token needs `tad users add {user_name} "
                        "--admin`")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, token_hash=hash_token(secret), scope=scope)
    session.add(row)
    session.flush()
    return NewToken(_token_info(row, user.name), secret)


def list_tokens(session: Session, user_name: str | None = None) -> list[TokenInfo]:
    """Every token (never its secret), optionally of one user, oldest first."""
    stmt = select(ApiToken, User.name).join(User, User.id == ApiToken.user_id).order_by(ApiToken.id)
    if user_name is not None:
        stmt = stmt.where(User.name == user_name)
    return [_token_info(t, name) for t, name in session.execute(stmt)]


def revoke_token(session: Session, token_id: int) -> TokenInfo:
    """Revoke a token (idempotent: revoking twice keeps the first time)."""
    row = session.execute(select(ApiToken, User.name).join(User, User.id == ApiToken.user_id)
                          .where(ApiToken.id == token_id)).first()
    if row is None:
        raise NotFound(f"token {token_id} does not exist (tad tokens list)")
    token, name = row
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.flush()
    return _token_info(token, name)


def authenticate(session: Session, secret: str) -> Principal | None:
    """The principal behind `secret`, or None when it is unknown or revoked. Looks up by hash (an index hit)
    and compares the hashes in constant time; refreshes `last_used_at` at most once a minute."""
    if not secret or len(secret) > 512:
        return None
    digest = hash_token(secret)
    row = session.execute(select(ApiToken, User.name).join(User, User.id == ApiToken.user_id)
                          .where(ApiToken.token_hash == digest)).first()
    if row is None:
        return None
    token, name = row
    if token.revoked_at is not None or not hmac.compare_digest(token.token_hash, digest):
        return None
    now = utcnow()
    last = token.last_used_at
    if last is not None and last.tzinfo is None:  # SQLite returns naive datetimes
        last = last.replace(tzinfo=now.tzinfo)
    if last is None or now - last > LAST_USED_GRANULARITY:
        token.last_used_at = now
        session.flush()
    return Principal(token.user_id, name, token.id, token.scope)


def owner_names(session: Session, job_ids: Sequence[int]) -> dict[int, str]:
    """job id -> owner's user name, for the jobs among `job_ids` that have an owner."""
    if not job_ids:
        return {}
    stmt = select(Job.id, User.name).join(User, User.id == Job.owner_id).where(Job.id.in_(list(job_ids)))
    return {job_id: name for job_id, name in session.execute(stmt)}
