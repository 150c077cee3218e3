"""The HTTP API (`tad serve`): one front door for submitters, authenticated by per-user bearer tokens."""
from services.api.app import create_app

__all__ = ["create_app"]
