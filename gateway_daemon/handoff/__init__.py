"""The hitless handoff: the running gateway passes its sockets and data-plane state to the
next version of itself over a Unix control socket, in the manner of tableflip and Envoy's
hot restart, plus established connections and per-tunnel state.

``wire`` frames messages and carries descriptors (SCM_RIGHTS); ``parent`` is the old
process's side; ``child`` the new process's side. The data plane is reached only through
``gateway_daemon.plane.Plane``.
"""
