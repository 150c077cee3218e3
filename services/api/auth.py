"""Bearer-token authentication and the ownership rule of the HTTP API.

`Authorization: Bearer <token>`: a missing, unknown or revoked token is 401. Changing a job (cancel, requeue)
needs its owner or an admin token; promoting an adapter needs an admin token (403 otherwise).
"""
from __future__ import annotations

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.db import store, users
from services.db.session import session_scope
from services.settings import Settings

bearer = HTTPBearer(auto_error=False, description="an API token from `tad tokens create NAME`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def settings_of(request: Request) -> Settings:
    """The settings the app was created with (one deployment per app)."""
    return request.app.state.settings


def current_principal(request: Request,
                      creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> users.Principal:
    """The caller behind the request's bearer token; 401 when there is none or it is unknown or revoked."""
    if creds is None or not creds.credentials:
        raise HTTPException(401, "missing API token: send the header `Authorization: Bearer <token>`",
                            headers=_CHALLENGE)
    with session_scope(settings_of(request)) as s:
        principal = users.authenticate(s, creds.credentials)
    if principal is None:
        raise HTTPException(401, "invalid or revoked API token", headers=_CHALLENGE)
    return principal


def require_admin(principal: users.Principal = Depends(current_principal)) -> users.Principal:
    """The caller, when their token has the admin scope; 403 otherwise."""
    if not principal.is_admin:
        raise HTTPException(403, "this needs an admin token (tad tokens create NAME --scope admin)")
    return principal


def require_job_owner(settings: Settings, job_id: int, principal: users.Principal) -> store.JobInfo:
    """The job, when the caller owns it or holds an admin token; 404 for an unknown job, 403 for another
    user's job (a job submitted straight to the database has no owner: admins only)."""
    with session_scope(settings) as s:
        job = store.get_job(s, job_id)
    if not (principal.is_admin or job.owner_id == principal.user_id):
        raise HTTPException(403, f"job {job_id} belongs to another user; only its owner or an admin token may "
                                 "change it")
    return job
