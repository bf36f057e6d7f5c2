"""The release version of the code that is running.

A release artifact (a zipapp built by ``upgradectl releases build``) carries a ``RELEASE``
file inside this package; code installed from the source tree has none and reports the
project's version from its package metadata.
"""

from __future__ import annotations

import functools
import zipfile
import zlib
from importlib import metadata, resources
from pathlib import Path

RELEASE_FILE = "RELEASE"
# Where the stamp sits inside a release artifact.
STAMP_PATH = f"hitless/{RELEASE_FILE}"
_MAX_STAMP_BYTES = 256


@functools.cache
def current() -> str:
    """The version of the running code, e.g. ``"1.2.0"``."""
    stamped = resources.files("hitless").joinpath(RELEASE_FILE)
    if stamped.is_file():
        return stamped.read_text(encoding="utf-8").strip()
    return metadata.version("hitless")


def stamped(artifact: Path) -> str | None:
    """The version stamped inside the release artifact at ``artifact`` (a zipapp built by
    ``upgradectl releases build``), or None when it is no zip file or carries no stamp.

    What a gateway runs after swapping to ``artifact`` reports this version, so a release
    whose stamp is not its own version is refused before anything runs it.
    """
    try:
        with zipfile.ZipFile(artifact) as zf:
            info = zf.getinfo(STAMP_PATH)
            if info.file_size > _MAX_STAMP_BYTES:
                return None
            return zf.read(info).decode("utf-8", errors="replace").strip()
    except (
        KeyError,
        OSError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        RuntimeError,  # e.g. an encrypted entry
        NotImplementedError,  # an unsupported compression method
        ValueError,
    ):
        return None
