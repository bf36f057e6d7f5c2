"""What the console keeps in a browser's session, and the secret that signs it.

The session is Starlette's ``SessionMiddleware``: a cookie holding JSON, signed with
itsdangerous (HMAC) under the secret in ``<data dir>/console.secret``, which the controller
versions of one data directory share, so a session outlives an inline upgrade. The cookie
is HttpOnly, SameSite=Strict and Secure, and expires 12 hours after it was last set; a
login is good for 12 hours at most whatever happens in between.

It holds the user's name (never the role, read again on every request, so a removed user
is out at once), when the login happened, and the CSRF token: a random value every form
carries in a hidden ``csrf_token`` field, compared in constant time (the synchroniser
token pattern of OWASP's CSRF prevention cheat sheet).
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from pathlib import Path

from starlette.datastructures import FormData
from starlette.requests import Request

from hitless import pki
from hitless.errors import ConfigError

COOKIE = "hitless_session"
MAX_AGE_S = 12 * 3600
SECRET_FILE = "console.secret"
CSRF_FIELD = "csrf_token"
_USER, _CSRF, _SINCE = "user", "csrf", "since"


def load_secret(data_dir: Path) -> str:
    """The session secret in ``data_dir/console.secret``, made (0600) when there is none.
    Raises ConfigError when the file may be read by others or cannot be made."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        tmp = data_dir / f".{SECRET_FILE}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(tmp, path)  # never replaces a secret another controller made meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    secret = pki.read_private(path).decode("ascii", errors="replace").strip()
    if len(secret) < 32:
        raise ConfigError(f"{path} holds no usable secret: delete it and restart to make one")
    return secret


def csrf_token(request: Request) -> str:
    """This session's CSRF token, made on first use."""
    token = request.session.get(_CSRF)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        request.session[_CSRF] = token
    return token


def csrf_matches(request: Request, form: FormData) -> bool:
    """Whether ``form`` carries this session's CSRF token."""
    sent = form.get(CSRF_FIELD)
    expected = request.session.get(_CSRF)
    if not isinstance(sent, str) or not isinstance(expected, str) or not expected:
        return False
    return hmac.compare_digest(sent.encode(), expected.encode())


def logged_in(request: Request) -> tuple[str, float] | None:
    """The name logged in on this session and when (seconds since the epoch); None when
    nobody is or the login is older than MAX_AGE_S."""
    name, since = request.session.get(_USER), request.session.get(_SINCE)
    if not isinstance(name, str) or not isinstance(since, int | float):
        return None
    if not 0 <= time.time() - since < MAX_AGE_S:
        return None
    return name, float(since)


def log_in(request: Request, name: str) -> None:
    """Start a new session for ``name``, with a new CSRF token (nothing of the session
    before the login is kept)."""
    request.session.clear()
    request.session.update({_USER: name, _SINCE: time.time()})
    csrf_token(request)


def log_out(request: Request) -> None:
    request.session.clear()
