"""``gateway-daemon``: the gateway's command line. Flags and environment are read here only.

gateway-daemon run --id ID [--controller HOST:PORT] [--amqp URL] [--state-dir DIR]
                   [--enroll-code CODE --ca-cert FILE] [--trust-root FILE]
                   [--download-from HOST:PORT]
                   [--listen HOST:PORT]... [--tunnels FILE] [--handoff-timeout S]
                   [--vpn-listen HOST:PORT] [--vpn-keepalive-timeout S]
                   [--heartbeat-interval S] [--ha-peer ID]
gateway-daemon enroll --id ID --code CODE --ca-cert FILE [--controller HOST:PORT]
                      [--state-dir DIR]
gateway-daemon vpn-service --state-dir DIR --listen HOST:PORT [--keepalive-timeout S]
gateway-daemon traffic (--write-lab DIR | --sites FILE) [--rate PPS] [--duration S] ...

``run`` is the forwarding process (``forwarding``): it loads no gRPC, pika or TUF, so it
reads only the flags it needs itself and starts the agent (``agent``, internal) with the
whole command line, which the agent reads (enrollment, the trust root, the broker).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from gateway_daemon import forwarding
from gateway_daemon.handoff import child
from gateway_daemon.handoff.parent import Deadlines
from gateway_daemon.state import AgentState
from gateway_daemon.tunnels import traffic
from gateway_daemon.tunnels.config import TunnelsConfig
from gateway_daemon.vpn import service as vpn_service
from gateway_daemon.vpn.config import DEFAULT_KEEPALIVE_TIMEOUT_S, VpnConfig
from hitless import config, heap, logs
from hitless.errors import ConfigError, HitlessError

ENV_ENROLL_CODE = "HITLESS_ENROLL_CODE"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway-daemon", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a gateway")
    run.add_argument("--id", required=True, help="this gateway's id, e.g. gw-1")
    run.add_argument("--controller", help=f"controller HOST:PORT (env {config.ENV_CONTROLLER})")
    run.add_argument("--amqp", help=f"broker URL (env {config.ENV_AMQP_URL})")
    run.add_argument("--state-dir", help="where downloads, releases and agent state live")
    run.add_argument(
        "--trust-root", type=Path, metavar="FILE",
        help="root.json made by `upgradectl keys init`: the trust anchor releases and "
        f"commands are verified against (env {config.ENV_TRUST_ROOT}); needed once, then "
        "kept in the state directory",
    )  # fmt: skip
    run.add_argument(
        "--listen", action="append", default=[], metavar="HOST:PORT",
        help="a TCP address to serve (repeatable)",
    )  # fmt: skip
    run.add_argument(
        "--tunnels", type=Path, metavar="FILE",
        help="the tunnels config to serve (see gateway_daemon/tunnels/config.py)",
    )  # fmt: skip
    run.add_argument(
        "--handoff-timeout", type=float, default=Deadlines.ready_s, metavar="S",
        help="how long a new version may take to start and say ready in an upgrade before "
        f"it is killed and the upgrade rolled back (default {Deadlines.ready_s:g})",
    )  # fmt: skip
    run.add_argument(
        "--vpn-listen", metavar="HOST:PORT",
        help="run the gateway's VPN service (TLS) on this address, in a process of its own",
    )  # fmt: skip
    run.add_argument(
        "--vpn-keepalive-timeout", type=float, default=DEFAULT_KEEPALIVE_TIMEOUT_S, metavar="S",
        help="the VPN service drops a session silent this long "
        f"(default {DEFAULT_KEEPALIVE_TIMEOUT_S:g})",
    )  # fmt: skip
    run.add_argument(
        "--heartbeat-interval", type=float, default=config.HEARTBEAT_INTERVAL_S, metavar="S",
        help="seconds between heartbeats to the controller, which carry the VPN session "
        f"count (default {config.HEARTBEAT_INTERVAL_S:g})",
    )  # fmt: skip
    run.add_argument(
        "--ha-peer", default="", metavar="ID",
        help="the other gateway of this one's high-availability pair: upgrades never take "
        "both at once",
    )  # fmt: skip
    _enroll_arguments(run, code_flag="--enroll-code")
    run.add_argument(
        "--download-from", metavar="HOST:PORT",
        help="the controller's gateway port as this gateway reaches it (default: the "
        "--controller host and the port enrollment gave), e.g. through a NAT or a proxy",
    )  # fmt: skip
    # Internal: set by the old version when it hands its sockets to this process.
    run.add_argument("--handoff-fd", type=int, help=argparse.SUPPRESS)
    # Internal: the agent process, started by `run` with one end of its control socket.
    agent = commands.add_parser("agent")
    agent.add_argument("--control-fd", type=int, required=True)
    enroll = commands.add_parser(
        "enroll",
        help="obtain this gateway's certificate, broker login and trust root with a one-time "
        "code (upgradectl gateways enroll ID), once; enrolling again replaces them",
    )
    enroll.add_argument("--id", required=True, help="this gateway's id, e.g. gw-1")
    enroll.add_argument(
        "--controller", help=f"the controller's API HOST:PORT (env {config.ENV_CONTROLLER})"
    )
    enroll.add_argument("--state-dir", help="the gateway's state directory")
    _enroll_arguments(enroll, code_flag="--code")
    vpn = commands.add_parser(
        "vpn-service", help="the VPN service process (normally started by `run --vpn-listen`)"
    )
    vpn_service.add_arguments(vpn)
    tool = commands.add_parser(
        "traffic", help="play a gateway's remote sites and measure what gets through"
    )
    traffic.add_arguments(tool)
    return parser


def _enroll_arguments(parser: argparse.ArgumentParser, code_flag: str) -> None:
    parser.add_argument(
        code_flag, dest="code", metavar="CODE",
        help="the one-time enrollment code `upgradectl gateways enroll ID` printed (env "
        f"{ENV_ENROLL_CODE}); used once, when the gateway has no identity yet",
    )  # fmt: skip
    parser.add_argument(
        "--ca-cert", type=Path, metavar="FILE",
        help="the controller's CA certificate (its <data dir>/pki/ca.pem), which checks the "
        f"controller at enrollment (env {config.ENV_CA_CERT})",
    )  # fmt: skip


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return config.data_dir(args.state_dir)
    gateway_id: str = args.id
    return config.data_dir() / "gateways" / gateway_id


def _enroll(args: argparse.Namespace, state_dir: Path, controller: config.HostPort) -> None:
    """Enroll with the code and CA the arguments (or environment) give."""
    from gateway_daemon import identity
    from hitless import pki

    code = args.code or config.env_secret(ENV_ENROLL_CODE)
    ca_file = args.ca_cert or os.environ.get(config.ENV_CA_CERT)
    if not code or not ca_file:
        missing = " and ".join(
            what for what, given in (("an enrollment code", code), ("--ca-cert FILE", ca_file))
            if not given
        )  # fmt: skip
        raise ConfigError(
            f"gateway {args.id} is not enrolled and {missing} is missing: ask an admin for a "
            f"code (upgradectl gateways enroll {args.id}) and the controller's "
            "<data dir>/pki/ca.pem, then give them here"
        )
    ca_pem = pki.read_certificate(Path(ca_file), "controller CA (--ca-cert)")
    found = identity.enroll(state_dir, args.id, controller, ca_pem, code)
    user = f", broker user {found.broker_user}" if found.broker_user else ""
    print(
        f"gateway-daemon: enrolled {args.id}{user}; its certificate and credentials are in "
        f"{identity.directory(state_dir)}",
        file=sys.stderr,
    )


def _enrolled(cfg: config.GatewayConfig, args: argparse.Namespace) -> config.GatewayConfig:
    """``cfg`` with the identity of the enrolled gateway: downloads from the controller's
    gateway port, and the gateway's own broker login. Enrolls first when it has none and
    a code is given."""
    from gateway_daemon import identity

    found = identity.load(cfg.state_dir)
    if found is None:
        _enroll(args, cfg.state_dir, cfg.controller)
        found = identity.load(cfg.state_dir)
        assert found is not None
    elif found.gateway_id != cfg.gateway_id:
        raise ConfigError(
            f"the state directory {cfg.state_dir} holds the identity of gateway "
            f"{found.gateway_id}, not {cfg.gateway_id}: give each gateway its own --state-dir"
        )
    download_from = (
        config.HostPort.parse(args.download_from, what="--download-from address")
        if args.download_from
        else found.download_address(cfg.controller)
    )
    return dataclasses.replace(
        cfg,
        controller=download_from,
        # Its own broker user may declare nothing: the controller declared its queue.
        bus=dataclasses.replace(
            cfg.bus, url=found.amqp_url(cfg.bus.url), passive=bool(found.broker_user)
        ),
    )


def _config(args: argparse.Namespace) -> config.GatewayConfig:
    state_dir = _state_dir(args)
    return config.GatewayConfig(
        gateway_id=args.id,
        controller=config.HostPort.parse(
            args.controller or os.environ.get(config.ENV_CONTROLLER) or config.DEFAULT_CONTROLLER,
            what="controller address",
        ),
        bus=config.BusConfig.from_env(
            args.amqp or config.env_secret(config.ENV_AMQP_URL) or config.DEFAULT_AMQP_URL
        ),
        state_dir=state_dir,
        listen=tuple(config.HostPort.parse(a, what="listen address") for a in args.listen),
        heartbeat_interval_s=args.heartbeat_interval,
        ha_peer=args.ha_peer,
    )


def _vpn_config(args: argparse.Namespace, state_dir: Path) -> VpnConfig | None:
    if not args.vpn_listen:
        return None
    return VpnConfig(
        listen=config.HostPort.parse(args.vpn_listen, what="VPN listen address"),
        state_dir=state_dir,
        keepalive_timeout_s=args.vpn_keepalive_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    heap.freeze_at_exit()
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command == "traffic":
        return traffic.main(args)
    if args.command == "vpn-service":
        try:
            return vpn_service.main(args)
        except ConfigError as exc:
            print(f"gateway-daemon vpn-service: error: {exc}", file=sys.stderr)
            return 2
    logs.configure("gateway-daemon", json=True)
    try:
        if args.command == "enroll":
            controller = config.HostPort.parse(
                args.controller
                or os.environ.get(config.ENV_CONTROLLER)
                or config.DEFAULT_CONTROLLER,
                what="controller address",
            )
            _enroll(args, _state_dir(args), controller)
            return 0
        if args.command == "agent":
            return _agent(args)
        if args.handoff_fd is not None:
            inheritance = child.accept(args.handoff_fd)
            return forwarding.take_over(inheritance, args.id, _state_dir(args))
        cfg = _config(args)
        # A staged release checks its own flags and files: exec it before reading them.
        forwarding.exec_current_release(AgentState(cfg.state_dir), argv)
        if args.handoff_timeout <= 0:
            raise ConfigError(f"--handoff-timeout must be > 0 seconds, got {args.handoff_timeout}")
        if args.heartbeat_interval <= 0:
            raise ConfigError(
                f"--heartbeat-interval must be > 0 seconds, got {args.heartbeat_interval}"
            )
        _vpn_config(args, cfg.state_dir)  # checked here, used by the agent
        return forwarding.run_fresh(
            gateway_id=cfg.gateway_id,
            state_dir=cfg.state_dir,
            listen=cfg.listen,
            tunnels=TunnelsConfig.load(args.tunnels) if args.tunnels else None,
            deadlines=Deadlines(ready_s=args.handoff_timeout),
            run_args=argv,
        )
    except ConfigError as exc:
        print(f"gateway-daemon: error: {exc}", file=sys.stderr)
        return 2
    except (HitlessError, OSError) as exc:
        print(f"gateway-daemon: error: {exc}", file=sys.stderr)
        return 1


def _agent(args: argparse.Namespace) -> int:
    """The agent process: configured by its start message (``control``), from the
    ``run`` command line of a fresh start or the context a handoff brought."""
    import socket

    from gateway_daemon import agent_process
    from gateway_daemon import trust as gateway_trust
    from gateway_daemon.control import PlaneClient

    plane = PlaneClient(socket.socket(fileno=args.control_fd))
    start = plane.first()
    try:
        context = start.get("context")
        if context:
            agent = agent_process.AgentProcess(
                agent_process.config_from_context(context), plane,
                deadlines=forwarding.deadlines_from_context(context),
                vpn=agent_process.vpn_from_context(context),
                takeover=bool(start.get("ready_check")),
                ready_by=start.get("ready_by"),
            )  # fmt: skip
        else:
            run = _parser().parse_args(list(start["run_args"]))
            cfg = _enrolled(_config(run), run)
            given = run.trust_root or os.environ.get(config.ENV_TRUST_ROOT)
            gateway_trust.provision(cfg.state_dir, Path(given) if given else None)
            agent = agent_process.AgentProcess(
                cfg, plane, deadlines=Deadlines(ready_s=run.handoff_timeout),
                vpn=_vpn_config(run, cfg.state_dir),
            )  # fmt: skip
    except HitlessError as exc:
        plane.fail(str(exc))
        raise
    agent_process.install_signal_handlers(agent)
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
