"""What the controller's gRPC API says beyond its ``.proto`` (``proto/hitless/v1``), shared
by the controller and its clients."""

from __future__ import annotations

from typing import Final

# The initial metadata a WatchJob stream starts with once the controller has taken the
# watch (the job exists and the controller is not stopping). A stream cut after it came
# was cut by a controller that was there: a client's retry budget counts again from the
# cut, however long that stream was quiet.
WATCH_OPEN: Final = ("x-hitless-watch", "open")
