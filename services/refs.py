"""Names of registered things and references to their versions, one rule for every caller: an adapter family's
or a suite's NAME, and `NAME:VERSION` / `NAME:latest` / `NAME` (the newest version) as the CLI, the API, the
dashboard and suite files write them."""
from __future__ import annotations

import re

MAX_ID = 2**31 - 1  # ids and versions are 32-bit integers in the database: larger ones are refused, not looked up
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")  # no ':' (the version separator) and no '/'


class RefError(ValueError):
    """A reference that is not `NAME:VERSION`; the message names what it refers to and the text given."""


def parse_ref(text: str, what: str) -> tuple[str, int | None]:
    """`NAME:VERSION` (or `NAME`, `NAME:latest`) -> (name, version; None for the newest)."""
    name, sep, ver = text.strip().partition(":")
    if not name:
        raise RefError(f"{what} {text!r}: expected NAME:VERSION")
    if not sep or ver == "latest":
        return name, None
    if not (ver.isascii() and ver.isdigit()) or not 1 <= int(ver) <= MAX_ID:
        raise RefError(f"{what} {text!r}: the version must be an integer from 1 to {MAX_ID} or 'latest'")
    return name, int(ver)
