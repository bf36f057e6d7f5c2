"""The operator's command line (``upgradectl``)."""

import os

# gRPC's core logs each failed TLS handshake at INFO on stderr, ahead of upgradectl's own
# message that says what to do; it keeps its errors. Must be set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
