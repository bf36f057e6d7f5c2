"""Run a gateway's tunnels data plane on its own, without the agent.

    python -m gateway_daemon.tunnels.serve --tunnels tunnels.json [--stats-every 5]

For the lab and for benchmarks: the gateway proper (``gateway-daemon --tunnels FILE``)
builds the same ``TunnelPlane`` and hands it over on upgrades. Stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from gateway_daemon.tunnels.config import TunnelsConfig
from gateway_daemon.tunnels.errors import TunnelConfigError
from gateway_daemon.tunnels.plane import TunnelPlane
from hitless import logs

EXIT_OK = 0
EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnels-serve", description=__doc__.split("\n")[0])
    parser.add_argument("--tunnels", type=Path, required=True, help="tunnels config file")
    parser.add_argument("--stats-every", type=float, default=0.0, help="print stats every N s")
    args = parser.parse_args(argv)
    logs.configure("gateway-tunnels")
    try:
        config = TunnelsConfig.load(args.tunnels)
    except TunnelConfigError as exc:
        print(f"tunnels-serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with TunnelPlane.from_config(config) as plane:
        print(json.dumps({"serving": plane.endpoints()}), flush=True)
        while not stop.wait(args.stats_every or None):
            print(json.dumps(plane.stats()), flush=True)
        print(json.dumps(plane.stats()), flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
