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
    # The releases it goes through, the last the target (``upgrade_path``); empty when it
    # goes straight there (or changes nothing).
    path: tuple[str, ...] = ()
    # Why it cannot be upgraded to the target (no upgrade path reaches it); "" when it
    # can. Such a gateway is left out of the job, SKIPPED with this reason.
    blocked: str = ""
    # ONLINE, OFFLINE or UPGRADING when planned (``liveness.gateway_state``); "" unknown.
    state: str = ""


@dataclass(frozen=True)
class Plan:
    release: ReleaseRecord
    gateways: tuple[PlannedGateway, ...]
    # The version the controller runs when it upgrades itself to the release before any
    # gateway; None when it does not.
    controller_from: str | None = None

    @property
    def changes(self) -> tuple[PlannedGateway, ...]:
        return tuple(g for g in self.gateways if g.action != NOTHING)

    @property
    def vpn_sessions_affected(self) -> int:
        if not self.release.restarts_vpn_service:
            return 0
        return sum(g.vpn_sessions for g in self.changes)


def make_plan(
    release: ReleaseRecord,
    known: Mapping[str, GatewayRecord],
    gateway_ids: Sequence[str],
    releases: Sequence[ReleaseRecord] = (),
) -> Plan:
    """The plan for ``gateway_ids`` (every known gateway when empty). A gateway the
    target's ``min_from`` is above goes through intermediate ``releases`` (those it may
    run: signed; ``upgrade_path``); one no path reaches the target from is ``blocked``
    with the reason. Raises NotFound for an unknown gateway, FailedPrecondition for no
    gateway at all."""
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
            "starts and reaches the broker, once enrolled (a code from `upgradectl gateways "
            "enroll ID`, given to `gateway-daemon enroll` or `run --enroll-code`)"
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
        path: tuple[str, ...] = ()
        blocked = ""
        if action == UPGRADE:
            # From what it runs now: commands of an unfinished job that it has not
            # started are superseded by this one, so it may never run that job's target.
            try:
                path = upgrade_path(gateway.version, release, releases, gateway_id=gid)
            except FailedPrecondition as exc:
                blocked = str(exc)
        planned.append(
            PlannedGateway(
                gid,
                gateway.version,
                action,
                gateway.vpn_sessions,
                gateway.pending_version,
                path if len(path) > 1 else (),
                blocked,
            )
        )
    return Plan(release, tuple(planned))


def upgrade_path(
    from_version: str,
    target: ReleaseRecord,
    releases: Sequence[ReleaseRecord],
    *,
    gateway_id: str = "the gateway",
) -> tuple[str, ...]:
    """The releases a gateway on ``from_version`` goes through to reach ``target``, in
    order, the last ``target.version``: ``(target.version,)`` when the target upgrades
    from it (no ``min_from``, or ``from_version`` at or above it).

    A release with ``min_from`` M upgrades from M and every later version, so what is
    reachable only grows with the version a gateway runs; each hop therefore takes the
    newest release of ``releases`` (up to the target) that upgrades from where the
    gateway is, which makes the path as short as any (the greedy choice of the "jump
    game"). A version that is not semantic (a gateway of a hand-made build) goes
    straight to the target. Raises FailedPrecondition naming the release that cannot be
    reached when no release of ``releases`` leads on."""
    if not semver.is_valid(from_version):
        return (target.version,)
    here = semver.parse(from_version)
    goal = semver.parse(target.version)
    candidates = sorted(
        {
            r.version: r for r in [*releases, target] if here < semver.parse(r.version) <= goal
        }.values(),
        key=lambda r: semver.parse(r.version),
        reverse=True,
    )
    path: list[str] = []
    while here < goal:
        step = next(
            (r for r in candidates if semver.parse(r.version) > here and _upgrades_from(r, here)),
            None,
        )
        if step is None:
            raise FailedPrecondition(
                f"no upgrade path for {gateway_id} from {from_version} to {target.version}: "
                f"{target.version} upgrades only from {target.min_from} on, and no signed "
                f"release up to it upgrades from {here}"
                + (f" (reached through {', '.join(path)})" if path else "")
                + ": publish one that does, or upgrade it to such a release first"
            )
        path.append(step.version)
        here = semver.parse(step.version)
    return tuple(path)


def _upgrades_from(release: ReleaseRecord, version: semver.Version) -> bool:
    return not release.min_from or version >= semver.parse(release.min_from)


def check(plan: Plan, *, allow_downgrade: bool, accept_vpn_disruption: bool) -> None:
    """Refuse, with what to do instead, a plan the operator has not agreed to, or one in
    which no gateway that would change can be upgraded (each ``blocked``: no path)."""
    version = plan.release.version
    if not plan.changes:
        raise FailedPrecondition(f"nothing to do: every chosen gateway already runs {version}")
    if all(g.blocked for g in plan.changes):
        raise FailedPrecondition(
            "; ".join(g.blocked for g in plan.changes[:10])
            + (f" (and {len(plan.changes) - 10} more)" if len(plan.changes) > 10 else "")
        )
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
