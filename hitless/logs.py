"""Logging for every hitless process: structlog, one line per meaningful event.

Services log JSON to stderr; a terminal gets readable key=value lines. Bind context
(``gateway_id``, ``job_id``) with ``log.bind(...)`` where it is known.
"""

from __future__ import annotations

import logging
import sys

import structlog

# Context true for every line of this process, whatever the thread (contextvars are
# per thread): the service's name, and e.g. the gateway's id once it is known.
_process_context: dict[str, object] = {}


def _add_process_context(
    _logger: object, _method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    for key, value in _process_context.items():
        event.setdefault(key, value)
    return event


def bind_process(**context: object) -> None:
    """Add ``context`` to every later log line of this process, from any thread."""
    _process_context.update(context)


def configure(service: str, *, json: bool | None = None, level: str = "INFO") -> None:
    """Set up structlog for this process. ``json=None`` picks JSON unless stderr is a tty."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )

    _process_context.clear()
    _process_context["service"] = service
    structlog.configure(
        processors=[
            _add_process_context,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        # One write per line (the line and its newline together): a gateway's processes
        # share one stderr, and lines up to PIPE_BUF (4 KiB) never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # pika and grpc log through the standard library; keep their warnings only.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def get(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
