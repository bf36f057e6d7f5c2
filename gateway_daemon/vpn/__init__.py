"""The gateway's VPN service: the user-VPN endpoint, a TLS server in a process of its own.

Users hold long-lived sessions. The protocol (``protocol.py``) is one line each way:

    client: HELLO <user>          server: WELCOME <session-id>
    client: PING                  server: PONG          (keepalive, at least every 10 s)
    client: BYE                   server closes the session
    server: BYE <reason>          the service is stopping (a restart): reconnect
    server: ERROR <what>          then closes

A session that sends nothing for ``keepalive_timeout_s`` (default 30 s) is dropped.

The service runs beside the gateway daemon, not inside it (``service.py``), in its own
process group, so a handoff between daemon versions and a daemon's exit leave it and its
users alone. It keeps its files in ``<state dir>/vpn/``: ``cert.pem``/``key.pem`` (a
self-signed certificate made on first start, kept across restarts), ``service.pid`` and
``control.sock``, a Unix socket answering ``STATUS`` (pid, version, sessions) and ``STOP``
(drop every session, answer how many, exit) (``control.py``).

The daemon supervises it (``supervisor.py``): it attaches to the running service or starts
one, restarts it with bounded backoff when it dies, reads its session count for heartbeats,
and restarts it on purpose when a release says it restarts the VPN service.

    config.py      VpnConfig: where it listens, where its files are, keepalive timeout
    certs.py       the self-signed certificate and the TLS contexts
    protocol.py    the line protocol's words and limits
    service.py     the service process (``gateway-daemon vpn-service``)
    control.py     the control socket's client side: status, stop
    supervisor.py  the daemon's side: attach or start, watch, restart
"""
