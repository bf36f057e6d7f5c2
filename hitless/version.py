"""The release version of the code that is running.

A release artifact (a zipapp built by ``upgradectl releases build``) carries a ``RELEASE``
file inside this package; code installed from the source tree has none and reports the
project's version from its package metadata.
"""

from __future__ import annotations

import functools
from importlib import metadata, resources

RELEASE_FILE = "RELEASE"


@functools.cache
def current() -> str:
    """The version of the running code, e.g. ``"1.2.0"``."""
    stamped = resources.files("hitless").joinpath(RELEASE_FILE)
    if stamped.is_file():
        return stamped.read_text(encoding="utf-8").strip()
    return metadata.version("hitless")
