"""The smallest artifact a release accepts: a zip holding only the version stamp
(``hitless.version.STAMP_PATH``), for tests about importing releases rather than running
them (those build real ones with ``tests.support.releases.build``)."""

from __future__ import annotations

import io
import zipfile

from hitless.version import STAMP_PATH

# A fixed timestamp keeps the bytes, and so the sha256, the same for the same version.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def stamped(version: str) -> bytes:
    """A zip whose stamp says ``version``; what ``hitless.version.stamped`` reads back."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(zipfile.ZipInfo(STAMP_PATH, _EPOCH), f"{version}\n")
    return buffer.getvalue()
