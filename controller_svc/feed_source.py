"""Where a release feed's documents are read from: a directory or an HTTP(S) URL, read
only inside the feed and only so far (``FeedSource``). What the documents say is checked
in ``controller_svc.feed``, which also draws the feed's error tree (``FeedError``,
``EntryRefused`` are defined here, where reads fail first).

Rules (README "The release feed" states them for operators):

- Locations (index entries, a manifest's ``artifact``, ``targets`` and ``notes``) stay
  inside the feed. Each is a relative path of plain segments joined by ``/``: no scheme,
  no host, no leading ``/``, no empty, ``.`` or ``..`` segment (also when percent-encoded),
  no backslash and no control character (NUL included), at most MAX_LOCATION_CHARS
  (``parse_location``). In a directory feed a path whose symlinks lead outside the feed's
  root is refused, and the file is opened without following a symlink on the way; over
  HTTP, a redirect that leaves the feed's root URL is refused.
- Every read is bounded by a limit its caller gives. A document that says it is longer is
  refused before it is read; one that turns out longer is refused at the first byte too
  many.
- Every read has a deadline: FETCH_SLACK_S plus one second per FETCH_FLOOR_BYTES_PER_S of
  its limit, so a server trickling bytes cannot hold a check for longer. It is checked
  after each block, so a read that stalls outright ends within one more read timeout
  (``_HTTP_TIMEOUT_S``).
"""

from __future__ import annotations

import http.client
import os
import re
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from controller_svc.errors import ControllerError
from hitless.errors import ConfigError

MAX_LOCATION_CHARS = 1024
# A fetch of a document of up to N bytes may take FETCH_SLACK_S + N / FETCH_FLOOR_BYTES_PER_S
# seconds: a 50 MB artifact about 5 minutes, the largest allowed (1 GiB) about 70 minutes.
FETCH_SLACK_S = 120.0
FETCH_FLOOR_BYTES_PER_S = 256 * 1024

_CHUNK = 256 * 1024
_HTTP_TIMEOUT_S = 30
_UNSAFE_IN_LOCATION = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
_SHOWN_CHARS = 200  # of a string from the feed, quoted in a message

Location = tuple[str, ...]  # path segments below the feed's root, percent-decoded


class FeedError(ControllerError):
    """The feed could not be read, or says something malformed."""


class EntryRefused(FeedError):
    """One entry of the feed broke a rule; ``field`` names the part that did."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def parse_location(text: object, field: str) -> Location:
    """The segments of ``text``, a location inside the feed, percent-decoded.

    Raises EntryRefused naming ``field`` unless ``text`` is a relative path of plain
    segments (the rules in this module's docstring): what stays is a path below the
    folder it is relative to, whatever the feed is.
    """
    if not isinstance(text, str) or not text:
        raise EntryRefused(field, f"expected a relative path inside the feed, got {show(text)}")
    if len(text) > MAX_LOCATION_CHARS:
        raise EntryRefused(field, f"path longer than {MAX_LOCATION_CHARS} characters")
    if _UNSAFE_IN_LOCATION.search(text):
        raise EntryRefused(
            field, f"{show(text)} has a backslash or a control character; use '/' between names"
        )
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise EntryRefused(field, f"{show(text)} is not a path: {exc}") from exc
    if parts.scheme or parts.netloc or text.startswith("/"):
        raise EntryRefused(
            field,
            f"{show(text)} leaves the feed: give a path relative to the feed "
            "(no scheme, host or leading '/')",
        )
    segments = []
    for raw in text.split("/"):
        try:
            segment = unquote(raw, errors="strict")
        except UnicodeDecodeError as exc:
            raise EntryRefused(
                field, f"{show(text)} percent-encodes bytes that are not UTF-8"
            ) from exc
        if segment in ("", ".", ".."):
            raise EntryRefused(
                field,
                f"{show(text)} has {'an empty' if not segment else repr(segment)} segment: "
                "give a path below the folder it is relative to",
            )
        if "/" in segment or _UNSAFE_IN_LOCATION.search(segment):
            raise EntryRefused(
                field, f"{show(text)} percent-encodes '/', a backslash or a control character"
            )
        segments.append(segment)
    return tuple(segments)


def show(value: object) -> str:
    """``value`` from the feed, quoted and cut short, for a message."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def shown(location: Location) -> str:
    """``location`` as a path, for a message."""
    return "/".join(location)


class _Readable(Protocol):
    def read1(self, size: int, /) -> bytes: ...


@dataclass(frozen=True)
class _Body:
    length: int | None  # what the feed says it holds before reading; None: not said
    stream: _Readable


class FeedSource:
    """Reads documents from a feed in a directory or at an http(s) URL, within the rules
    above. ``fetch_slack_s`` and ``clock`` (seconds, monotonic) set the deadlines; tests
    shorten the slack."""

    def __init__(
        self,
        source: str,
        *,
        fetch_slack_s: float = FETCH_SLACK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(source)
        self.source = source
        self._fetch_slack_s = fetch_slack_s
        self._clock = clock
        self._http = parts.scheme in ("http", "https")
        if self._http:
            if not parts.hostname or parts.query or parts.fragment:
                raise ConfigError(
                    f"invalid release feed {source!r}: give an http(s) URL with a host and "
                    "no query or fragment"
                )
            path = parts.path if parts.path.endswith("/") else parts.path + "/"
            self._root_url = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
            self._opener = _opener(self._root_url)
        elif parts.scheme in ("", "file"):
            path_text = unquote(parts.path) if parts.scheme == "file" else source
            self._root_dir = Path(path_text).expanduser().absolute()
        else:
            raise ConfigError(f"invalid release feed {source!r}: use a directory or an http(s) URL")

    def read(self, location: Location, field: str, limit: int) -> bytes:
        """The whole document at ``location``, as ``chunks`` reads it."""
        return b"".join(self.chunks(location, field, limit))

    def chunks(
        self, location: Location, field: str, limit: int, *, exact: bool = False
    ) -> Iterator[bytes]:
        """The document at ``location`` in blocks. EntryRefused naming ``field`` when it
        cannot be read, says or turns out to be longer than ``limit`` bytes (never more
        than ``limit`` + 1 bytes are read), or, ``exact``, says it is shorter; or when
        reading it takes longer than its deadline."""
        where = shown(location)
        bound = f"the manifest's size, {limit} bytes" if exact else f"the limit of {limit} bytes"
        allowed_s = self._fetch_slack_s + limit / FETCH_FLOOR_BYTES_PER_S
        deadline = self._clock() + allowed_s
        with self._open(location, field) as body:
            if body.length is not None and body.length > limit:
                raise EntryRefused(field, f"{where} has {body.length} bytes, over {bound}")
            if exact and body.length is not None and body.length < limit:
                raise EntryRefused(field, f"{where} has {body.length} bytes, short of {bound}")
            total = 0
            while True:
                # One byte beyond the limit is enough to know the document is too long;
                # read1 returns what has arrived, so a trickle meets the deadline check.
                try:
                    block = body.stream.read1(min(_CHUNK, limit + 1 - total))
                except (OSError, http.client.HTTPException) as exc:
                    raise EntryRefused(field, f"cannot read {where}: {exc}") from exc
                if not block:
                    return
                total += len(block)
                if total > limit:
                    raise EntryRefused(field, f"{where} is longer than {bound}")
                if self._clock() > deadline:
                    raise EntryRefused(
                        field,
                        f"reading {where} took over {allowed_s:.0f} s ({total} bytes read, "
                        f"{FETCH_FLOOR_BYTES_PER_S} bytes/s at least are needed): the feed's "
                        "server is too slow; it is tried again at the next check",
                    )
                yield block

    def _open(self, location: Location, field: str) -> AbstractContextManager[_Body]:
        if self._http:
            return self._open_url(location, field)
        return self._open_file(location, field)

    @contextmanager
    def _open_url(self, location: Location, field: str) -> Iterator[_Body]:
        url = self._root_url + "/".join(quote(s, safe="") for s in location)
        request = urllib.request.Request(url, headers={"Accept-Encoding": "identity"})
        try:
            response = self._opener.open(request, timeout=_HTTP_TIMEOUT_S)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise EntryRefused(field, f"cannot read {url}: {exc}") from exc
        with response:
            declared = response.headers.get("Content-Length", "")
            yield _Body(int(declared) if declared.isdigit() else None, response)

    @contextmanager
    def _open_file(self, location: Location, field: str) -> Iterator[_Body]:
        where = shown(location)
        try:
            root = self._root_dir.resolve(strict=True)
            real = root.joinpath(*location).resolve(strict=True)
        except FileNotFoundError as exc:
            raise EntryRefused(field, f"{where} is not in the feed {self._root_dir}") from exc
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise EntryRefused(field, f"cannot read {where}: {exc}") from exc
        if real == root or not real.is_relative_to(root):
            raise EntryRefused(
                field, f"{where} leads to {real} through a symlink, outside the feed {root}"
            )
        fd = _open_beneath(root, real.relative_to(root).parts, field, where)
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise EntryRefused(field, f"{where} is not a regular file")
            yield _Body(info.st_size, handle)


def _open_beneath(root: Path, parts: tuple[str, ...], field: str, where: str) -> int:
    """Open ``root/parts`` for reading without following a symlink on the way, so a path
    checked to be inside the feed cannot be swapped for a symlink out of it meanwhile."""
    no_follow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise EntryRefused(field, f"cannot read {where}: {exc}") from exc
    try:
        for part in parts[:-1]:
            inner = os.open(part, no_follow | os.O_DIRECTORY, dir_fd=folder)
            os.close(folder)
            folder = inner
        # Non-blocking: a FIFO in the feed must not hang the open (it is refused after).
        return os.open(parts[-1], no_follow | os.O_NONBLOCK, dir_fd=folder)
    except OSError as exc:
        raise EntryRefused(field, f"cannot read {where}: {exc}") from exc
    finally:
        os.close(folder)


def _opener(root_url: str) -> urllib.request.OpenerDirector:
    """HTTP(S) only (no file:, ftp: or data: handlers), following only redirects that
    stay below ``root_url``; proxies from the environment as usual."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _StayInFeed(root_url),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


class _StayInFeed(urllib.request.HTTPRedirectHandler):
    def __init__(self, root_url: str) -> None:
        self._root = urlsplit(root_url)

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not _below(urlsplit(newurl), self._root):
            raise urllib.error.HTTPError(
                req.full_url,
                code,
                f"redirected to {show(newurl)}, outside the feed {urlunsplit(self._root)}: refused",
                headers,
                fp,
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _below(url: Any, root: Any) -> bool:
    """Whether ``url`` is at or below ``root`` (both ``urlsplit`` results): same scheme,
    host and port, and a path under the root's without a '..' segment."""
    try:
        same_origin = (url.scheme.lower(), url.hostname, url.port) == (
            root.scheme.lower(),
            root.hostname,
            root.port,
        )
    except ValueError:  # a port that is not a number
        return False
    path = unquote(url.path)
    return same_origin and path.startswith(root.path) and ".." not in path.split("/")
