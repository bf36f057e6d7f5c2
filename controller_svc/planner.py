"""Deciding what an upgrade will do before doing it: which gateways change, in which
direction, and whom a VPN-restarting release disconnects. Pure domain logic."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controller_svc.errors import FailedPrecondition, NotFound
from controller_svc.records import GatewayRecord, ReleaseRecord
from hitless import names, semver

UPGRADE = "UPGRADE"
DOWNGRADE = "DOWNGRADE"
NOTHING = "NOTHING"


@dataclass(frozen=True)
class PlannedGateway:
    gateway_id: str
    from_version: str
    action: str
    vpn_sessions: int
    # The version an unfinished job is taking the gateway to, when there is one: a new
    # command runs after it, so the direction is judged against that version.
    pending_version: str | None = None


@dataclass(frozen=True)
class Plan:
    release: ReleaseRecord
    gateways: tuple[PlannedGateway, ...]

    @property
    def changes(self) -> tuple[PlannedGateway, ...]:
        return tuple(g for g in self.gateways if g.action != NOTHING)

    @property
    def vpn_sessions_affected(self) -> int:
        if not self.release.restarts_vpn_service:
            return 0
        return sum(g.vpn_sessions for g in self.changes)


def make_plan(
    release: ReleaseRecord, known: Mapping[str, GatewayRecord], gateway_ids: Sequence[str]
) -> Plan:
    """The plan for ``gateway_ids`` (every known gateway when empty)."""
    if gateway_ids:
        unknown = sorted(set(gateway_ids) - known.keys())
        if unknown:
            raise NotFound(
                f"unknown gateway(s): {_listed(unknown)}; known: {_listed(sorted(known)) or 'none'}"
            )
        chosen = list(dict.fromkeys(gateway_ids))
    else:
        chosen = sorted(known)
    if not chosen:
        raise FailedPrecondition(
            "no gateways are known yet: a gateway registers when `gateway-daemon run` "
            "starts and reaches the broker"
        )
    target = semver.parse(release.version)
    planned = []
    for gid in chosen:
        gateway = known[gid]
        # What it will run when this job's command reaches it: the version an unfinished
        # job takes it to, else the one it runs.
        then = gateway.pending_version or gateway.version
        if gateway.version == release.version and then == release.version:
            action = NOTHING
        elif semver.is_valid(then) and target < semver.parse(then):
            action = DOWNGRADE
        else:
            action = UPGRADE
        planned.append(
            PlannedGateway(
                gid, gateway.version, action, gateway.vpn_sessions, gateway.pending_version
            )
        )
    return Plan(release, tuple(planned))


def check(plan: Plan, *, allow_downgrade: bool, accept_vpn_disruption: bool) -> None:
    """Refuse, with what to do instead, a plan the operator has not agreed to."""
    version = plan.release.version
    if not plan.changes:
        raise FailedPrecondition(f"nothing to do: every chosen gateway already runs {version}")
    downgrades = [g for g in plan.changes if g.action == DOWNGRADE]
    if downgrades and not allow_downgrade:
        which = ", ".join(_running(g) for g in downgrades)
        raise FailedPrecondition(
            f"{version} is older than what {which} run(s): a downgrade needs --allow-downgrade "
            '(in a management job: "allow_downgrade": true)'
        )
    if plan.release.restarts_vpn_service and not accept_vpn_disruption:
        raise FailedPrecondition(
            f"release {version} restarts the VPN service, disconnecting "
            f"{plan.vpn_sessions_affected} connected VPN user(s): confirm the disruption "
            "(accept_vpn_disruption, or answer upgradectl's question / --yes)"
        )


def _running(gateway: PlannedGateway) -> str:
    """ "gw-1 (1.2.0)", or "gw-1 (1.2.0, 7.2.0 once its unfinished job is done)"."""
    if gateway.pending_version is None or gateway.pending_version == gateway.from_version:
        return f"{gateway.gateway_id} ({gateway.from_version})"
    return (
        f"{gateway.gateway_id} ({gateway.from_version}, {gateway.pending_version} once its "
        "unfinished job is done)"
    )


def _listed(ids: list[str], most: int = 10) -> str:
    """At most ``most`` ids, each cut to 40 characters, and how many more there are."""
    shown = ", ".join(i if len(i) <= 40 else names.shown(i) for i in ids[:most])
    return shown + (f" and {len(ids) - most} more" if len(ids) > most else "")
