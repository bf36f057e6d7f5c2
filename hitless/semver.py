"""Release versions: MAJOR.MINOR.PATCH, ordered numerically."""

from __future__ import annotations

import re
from typing import NamedTuple

from hitless.errors import ConfigError

_PATTERN = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
# The database keeps versions in 64-character columns.
MAX_LENGTH = 64


class Version(NamedTuple):
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def parse(text: str) -> Version:
    """Parse ``"1.2.3"``; anything else raises ConfigError saying what is expected."""
    match = _PATTERN.match(text.strip()) if len(text) <= MAX_LENGTH else None
    if not match:
        raise ConfigError(
            f"invalid version {text[:80]!r}: expected MAJOR.MINOR.PATCH with whole numbers, "
            f"at most {MAX_LENGTH} characters, e.g. 1.4.0"
        )
    major, minor, patch = (int(part) for part in match.groups())
    return Version(major, minor, patch)


def is_valid(text: str) -> bool:
    return len(text) <= MAX_LENGTH and bool(_PATTERN.match(text.strip()))
