"""The gateway's data plane: encrypted UDP and TCP tunnels, and what a handoff carries.

Where things are:

- ``config``     the tunnels config file (``TunnelsConfig``), validated on load
- ``wire``       packet and record formats
- ``handshake``  the X25519 one-round-trip handshake giving a session's keys
- ``session``    keys and counters of one tunnel (ChaCha20-Poly1305 seal/open)
- ``replay``     the receive-side replay window
- ``counters``   the counter table: every session's counters and window, shared with
                 the next process (a memfd)
- ``loop``       the single reactor thread, which pauses for a handoff
- ``udp``        UDP tunnel forwarding; ``tcp`` the TCP tunnel relay
- ``state``      the snapshot and final state, encoded for the next process
- ``plane``      ``TunnelPlane`` (a ``gateway_daemon.plane.Plane``) and ``adopt()``
- ``site``       the remote end of a tunnel, as the traffic tool plays it
- ``lab``        a gateway config and its matching sites file, generated together
- ``traffic``    the traffic tool (``gateway-daemon traffic``); ``report`` what it measured
- ``serve``      run the data plane alone (lab, benchmarks)
"""
