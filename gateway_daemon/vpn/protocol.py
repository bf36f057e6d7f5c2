"""The VPN service's line protocol: ASCII lines ending in ``\\n``, one message each.

Users (TLS):      HELLO <user> -> WELCOME <session-id>;  PING -> PONG;  BYE
Control (Unix):   STATUS -> {"pid", "version", "sessions", "listen"};  STOP -> {"dropped"}
"""

from __future__ import annotations

HELLO = "HELLO"
WELCOME = "WELCOME"
PING = "PING"
PONG = "PONG"
BYE = "BYE"
ERROR = "ERROR"

STATUS = "STATUS"
STOP = "STOP"

MAX_LINE = 256
MAX_USER = 64
# Sent to every user when the service stops on purpose, so clients know to reconnect.
BYE_RESTART = f"{BYE} service restarting"


def valid_user(name: str) -> bool:
    return 0 < len(name) <= MAX_USER and all(c.isalnum() or c in "-_.@" for c in name)
