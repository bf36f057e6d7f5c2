"""Whether a gateway is ONLINE, OFFLINE or UPGRADING: what the API's ListGateways and the
web console show for it."""

from __future__ import annotations

from datetime import datetime, timedelta

from controller_svc.records import GatewayRecord
from hitless.config import HEARTBEAT_INTERVAL_S

# Three missed heartbeats.
OFFLINE_AFTER = timedelta(seconds=3 * HEARTBEAT_INTERVAL_S)


def gateway_state(record: GatewayRecord, now: datetime) -> str:
    """UPGRADING while the gateway is in an unfinished job, else ONLINE when it was heard
    from within OFFLINE_AFTER of ``now``, else OFFLINE."""
    if record.busy:
        return "UPGRADING"
    if now - record.last_seen <= OFFLINE_AFTER:
        return "ONLINE"
    return "OFFLINE"
