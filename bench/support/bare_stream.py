"""A bare grpcio stream for ``bench/stream.py``: one file streamed in the controller's
chunks by a grpcio server that does nothing else.

Run as ``python -m bench.support.bare_stream --pki DIR --file PATH --ports-file OUT``
from the project's root. It serves the unary-stream method ``/bench.Bare/Get`` on two
loopback ports: one with the controller's TLS (the server certificate in ``DIR``, client
certificates issued by its CA required, as on the gateway port), one in plaintext. Each
call answers the whole file as raw ``bytes`` messages of
``controller_svc.server.CHUNK_SIZE`` (``f.read``, one copy each, as the controller's
``Download`` makes; no protobuf, no limits, no database). Once serving it writes
``{"tls_port": N, "plain_port": M}`` to OUT (whole, by a rename), then serves until it is
terminated.

What a downloader of this server measures is grpcio moving bytes over HTTP/2, with and
without TLS, through both processes' Python layers, in the configuration the product
uses (the synchronous server and default channel options, 1 MiB messages, one stream per
connection): a reference point beside the controller's stream, not the library's limit
in every configuration (other message sizes, options or ``grpc.aio`` were not measured).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

METHOD = "/bench.Bare/Get"
# More than any bench's downloaders at once (bench-fleet's default is 100): no call waits
# for a thread. Unlike the controller, no admission limit refuses any.
WORKERS = 256


def serve(pki: Path, path: Path) -> tuple[grpc.Server, int, int]:
    """A started server streaming ``path``; returns it with its TLS and plaintext ports."""
    # Here, not at the top: every downloader process of bench/stream.py imports this
    # module for ``fetch``, and needs none of the controller.
    from controller_svc.server import CHUNK_SIZE
    from hitless.pki import CertificateAuthority

    def get(_request: bytes, _context: Any) -> Iterator[bytes]:
        with path.open("rb") as f:
            while data := f.read(CHUNK_SIZE):
                yield data

    handler = grpc.method_handlers_generic_handler(
        "bench.Bare", {"Get": grpc.unary_stream_rpc_method_handler(get)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS))
    server.add_generic_rpc_handlers((handler,))
    credentials = CertificateAuthority(pki).server_credentials(require_client_certificate=True)
    tls_port = server.add_secure_port("127.0.0.1:0", credentials)
    plain_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, tls_port, plain_port


def fetch(channel: grpc.Channel) -> int:
    """Read one whole stream from the server on ``channel``; returns the bytes received."""
    call = channel.unary_stream(METHOD)
    return sum(len(message) for message in call(b""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pki", type=Path, required=True, help="the controller's pki directory")
    parser.add_argument("--file", type=Path, required=True, help="the file to stream")
    parser.add_argument("--ports-file", type=Path, required=True, help="where to say the ports")
    args = parser.parse_args()
    server, tls_port, plain_port = serve(args.pki, args.file)
    part = args.ports_file.with_suffix(".part")
    part.write_text(json.dumps({"tls_port": tls_port, "plain_port": plain_port}))
    part.rename(args.ports_file)
    server.wait_for_termination()  # SIGTERM ends the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
