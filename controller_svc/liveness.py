"""Whether a gateway is ONLINE, OFFLINE or UPGRADING: what the API's ListGateways and the
web console show for it."""

from __future__ import annotations

from datetime import datetime, timedelta

from controller_svc.records import GatewayRecord
from hitless.config import HEARTBEAT_INTERVAL_S

# How many heartbeats in a row a gateway may miss before it counts as OFFLINE.
MISSED_HEARTBEATS = 3
# The interval of a gateway whose hello announced none (an earlier release): the default.
DEFAULT_HEARTBEAT_INTERVAL = timedelta(seconds=HEARTBEAT_INTERVAL_S)
# Three missed heartbeats at the default interval.
OFFLINE_AFTER = MISSED_HEARTBEATS * DEFAULT_HEARTBEAT_INTERVAL


def offline_after(record: GatewayRecord) -> timedelta:
    """How long after it was last heard from the gateway counts as OFFLINE: three of the
    heartbeat intervals its hello announced, or of the default one when it announced none."""
    return MISSED_HEARTBEATS * (record.heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL)


def gateway_state(record: GatewayRecord, now: datetime) -> str:
    """UPGRADING while the gateway is in an unfinished job, else OFFLINE when its last
    message said it stops, else ONLINE when it was heard from within
    ``offline_after(record)`` of ``now``, else OFFLINE."""
    if record.busy:
        return "UPGRADING"
    if record.stopped:
        return "OFFLINE"
    if now - record.last_seen <= offline_after(record):
        return "ONLINE"
    return "OFFLINE"
