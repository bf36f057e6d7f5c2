"""Pages of the API's lists, as in Google AIP-158: ``page_size``, ``page_token``,
``next_page_token``.

A token is opaque to clients: URL-safe base64 of a small JSON object that names the list
it belongs to (``kind`` and, for a job's gateways, the job) and the sort key of the last
row sent. The next page starts after that key (keyset paging), so rows added or finished
meanwhile neither shift nor repeat the ones already sent. Nothing secret is in a token
and a forged one selects no row the caller could not list anyway, so it is not signed;
one that does not decode, or belongs to another list, is refused with InvalidRequest.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from controller_svc.errors import InvalidRequest

# The most rows one page holds; a larger page_size is lowered to it (AIP-158).
MAX_PAGE_SIZE = 1000
# The longest token read: real ones are well under 300 characters.
MAX_TOKEN_CHARS = 1024


@dataclass(frozen=True)
class Cursor:
    """Where a page starts: after the row whose sort key is ``after``, in the list
    ``kind`` (``scope`` narrows it: the job of a job's gateways)."""

    kind: str
    scope: str
    after: tuple[str, ...]


def page_size(asked: int, default: int) -> int:
    """The rows a page holds: ``default`` for 0, ``asked`` up to MAX_PAGE_SIZE (a larger
    number is lowered to it, as AIP-158 says). Raises InvalidRequest when negative."""
    if asked < 0:
        raise InvalidRequest(
            f"page_size {asked} is negative: ask for 1 to {MAX_PAGE_SIZE} rows, or 0 for "
            f"the default ({default})"
        )
    if asked == 0:
        return default
    return min(asked, MAX_PAGE_SIZE)


def encode(cursor: Cursor) -> str:
    """The ``next_page_token`` that continues after ``cursor``."""
    data = {"k": cursor.kind, "s": cursor.scope, "a": list(cursor.after)}
    raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, kind: str, scope: str | None = "", *, key_length: int = 1) -> Cursor | None:
    """The cursor in ``token`` (None for an empty token: the first page).

    ``scope`` None takes the token's own scope (a job's gateways asked for by token alone).
    Raises InvalidRequest when the token does not decode, belongs to another list than
    ``kind``/``scope``, or carries a key of another length than ``key_length``.
    """
    if not token:
        return None
    problem = "it does not decode (cut short, or not a token this controller made)"
    data: Any = None
    if len(token) <= MAX_TOKEN_CHARS:
        try:
            padded = token + "=" * (-len(token) % 4)
            data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        except (binascii.Error, ValueError, UnicodeError):
            data = None
    else:
        problem = f"it is longer than {MAX_TOKEN_CHARS} characters"
    if isinstance(data, dict):
        after, found = data.get("a"), data.get("s")
        if data.get("k") != kind or not isinstance(found, str) or scope not in (None, found):
            problem = "it belongs to another list: pass the token the same call answered"
        elif (
            isinstance(after, list)
            and len(after) == key_length
            and all(isinstance(part, str) for part in after)
        ):
            return Cursor(kind, found, tuple(after))
    raise InvalidRequest(
        f"invalid page_token for {kind}: {problem}; start again without a page_token"
    )
