"""Release versions: MAJOR.MINOR.PATCH, ordered numerically."""

from __future__ import annotations

import re
from typing import NamedTuple

from hitless.errors import ConfigError

_PATTERN = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


class Version(NamedTuple):
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def parse(text: str) -> Version:
    """Parse ``"1.2.3"``; anything else raises ConfigError saying what is expected."""
    match = _PATTERN.match(text.strip())
    if not match:
        raise ConfigError(
            f"invalid version {text!r}: expected MAJOR.MINOR.PATCH with whole numbers, e.g. 1.4.0"
        )
    major, minor, patch = (int(part) for part in match.groups())
    return Version(major, minor, patch)


def is_valid(text: str) -> bool:
    return bool(_PATTERN.match(text.strip()))
