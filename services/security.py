"""Security checks applied on submission: the submit token and the model-path roots.

- Submitting requires `TAD_SUBMIT_TOKEN` when it is set (compared in constant time).
- Base model, adapter and fine-tuned directories must resolve (symlinks followed) inside one of
  `TAD_MODEL_ROOTS`, so a submission cannot make a worker read arbitrary files (`../../etc`, symlink tricks).
- Nothing crosses the wire as pickle: Celery is configured JSON-only (services/celery_app.py) and adapters with
  pickled weights are refused unless `TAD_ALLOW_PICKLE` is set.
"""
from __future__ import annotations

import hmac
from pathlib import Path

from services.settings import Settings


class SecurityError(ValueError):
    """A submission was refused for a security reason; the message says why (never echoes secrets)."""


def check_submit_token(settings: Settings, token: str | None) -> None:
    """Refuse the submission when a token is configured and `token` does not match it."""
    expected = settings.submit_token.get_secret_value() if settings.submit_token else ""
    if not expected:
        return
    if not token:
        raise SecurityError("this deployment requires a submit token: pass --token or set TAD_TOKEN")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise SecurityError("submit token rejected")


def resolve_under_roots(path: str | Path, settings: Settings, what: str) -> Path:
    """`path` resolved (symlinks followed); SecurityError unless it lies inside a configured model root."""
    raw = str(path)
    if "\x00" in raw:
        raise SecurityError(f"{what} path contains a NUL byte")
    resolved = Path(raw).expanduser().resolve()
    roots = settings.allowed_roots()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots)
        raise SecurityError(f"{what} {raw!r} is outside the allowed model roots ({shown}); set TAD_MODEL_ROOTS")
    return resolved
