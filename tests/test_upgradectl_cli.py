"""The CLI and its gRPC client against a real gRPC server with canned answers.

The servicer below stands in for controller_svc: it speaks the real protocol over a real
socket, over TLS with a certificate from a CA of its own (made by ``hitless.pki`` as the
controller makes its own; the CLI is given it as ``HITLESS_CA_CERT``), and aborts with the
status codes the real controller uses, so what is tested is
the client's translation, retries, resumption and the CLI's output and exit codes. For
signed releases it hosts a real TUF repository (``hitless.trust.repository``, what the
controller uses), so signed metadata the CLI sends is accepted or refused for real.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from tuf.api.metadata import Targets

from hitless import api
from hitless.config import ENV_CA_CERT, ENV_CONTROLLER
from hitless.pki import CertificateAuthority
from hitless.trust import keys as trust_keys
from hitless.trust import roles as trust_roles
from hitless.trust.client import DirectorySource, TrustClient, verify_artifact
from hitless.trust.errors import TrustError
from hitless.trust.release import target_name
from hitless.trust.repository import Repository
from hitless.trust.verify import read_metadata, verify_role
from hitless.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from tests.support import certificates
from tests.support.fleet import Fleet
from tests.support.procs import free_port
from upgradectl import render
from upgradectl.cli import _build_parser, main, run
from upgradectl.client import CHUNK_SIZE, RetryPolicy
from upgradectl.errors import ExitCode

FAST_RETRY = RetryPolicy(budget_s=0.5, base_s=0.01, cap_s=0.05)
# The secret the fake's CreateToken hands out.
SECRET = "hlt_9Qe2vX7rLpB4kW1sZ8aN3cD6fG0hJ5mT"
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
GS = common_pb2.GatewayJobState
JS = common_pb2.JobState


def _ts(seconds: int = 0) -> dict[str, int]:
    return {"seconds": int(T0.timestamp()) + seconds}


def _job(state: int, gw: Iterable[tuple[str, int, str]], job_id: str = "job-1") -> Any:
    return controller_pb2.Job(
        job_id=job_id,
        state=state,
        target_version="1.2.0",
        created_at=_ts(),
        source="cli",
        gateways=[
            controller_pb2.GatewayJob(
                gateway_id=gid, state=s, from_version="1.1.0", to_version="1.2.0", error=e
            )
            for gid, s, e in gw
        ],
    )


def _release(version: str, *, notes: str = "", vpn: bool = False, age: int = 0) -> Any:
    data = bytes(f"release {version}", "ascii")
    return controller_pb2.Release(
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        published_at=_ts(-age),
        notes=notes,
        restarts_vpn_service=vpn,
    )


def _releases() -> list[Any]:
    return [
        controller_pb2.Release(
            version="1.2.0",
            sha256="ab" * 32,
            size=3 * 2**20,
            published_at=_ts(),
            notes="Faster rekeying.\nMore.",
            signing="SIGNED",
        ),
        controller_pb2.Release(
            version="1.1.0",
            sha256="cd" * 32,
            size=900,
            published_at=_ts(-86400),
            notes="",
            signing="YANKED",
        ),
    ]


def _gateways() -> list[Any]:
    return [
        controller_pb2.Gateway(id="gw-1", version="1.1.0", state="ONLINE", last_seen=_ts()),
        controller_pb2.Gateway(id="gw-22", version="1.0.0", state="OFFLINE"),
    ]


def _semver(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _event(seq: int, gid: str = "", gstate: int = 0, jstate: int = 0, **kw: Any) -> Any:
    return controller_pb2.JobEvent(
        seq=seq, at=_ts(seq), gateway_id=gid, gateway_state=gstate, job_state=jstate, **kw
    )


@dataclass
class FakeController(controller_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    """Canned answers, a record of what arrived, and failures on demand."""

    started: Any = None
    final: Any = None
    events: list[Any] = field(default_factory=list)
    # Per method: how many calls to answer with UNAVAILABLE before behaving.
    unavailable: dict[str, int] = field(default_factory=dict)
    unavailable_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    # Cut the first WatchJob stream with UNAVAILABLE after this many events.
    cut_watch_after: int | None = None
    cut_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    # Seconds the cut stream stays open and quiet before the cut (a controller slow to
    # hand over): longer than the client's retry budget tests that the budget counts
    # from the cut, not from the last event.
    quiet_before_cut_s: float = 0.0
    # Per WatchJob call, in order: the events it sends before it is cut (beyond the list,
    # cut_watch_after for the first call, else no cut).
    cut_plan: list[int] = field(default_factory=list)
    # Whether a WatchJob stream starts with hitless.api.WATCH_OPEN, as the controller's do.
    watch_opens: bool = True
    crash: bool = False
    # While set to an Event that is not set, StartUpgrade does its work only once it is
    # (a controller slower than the caller's deadline).
    stall: threading.Event | None = None
    gateways: list[Any] = field(default_factory=_gateways)
    releases: list[Any] = field(default_factory=_releases)  # newest first
    # What PlanUpgrade sees: gateway id -> (running version, connected VPN users).
    fleet: dict[str, tuple[str, int]] = field(
        default_factory=lambda: {"gw-1": ("1.1.0", 3), "gw-2": ("1.1.0", 5)}
    )
    jobs: list[Any] = field(default_factory=list)
    rejected: list[Any] = field(default_factory=list)
    admins: list[str] = field(default_factory=list)
    feed: list[Any] | None = None  # None: the controller has no release feed
    plan_requests: list[Any] = field(default_factory=list)
    start_requests: list[Any] = field(default_factory=list)
    watch_requests: list[Any] = field(default_factory=list)
    job_requests: list[Any] = field(default_factory=list)
    published: list[tuple[Any, bytes, int]] = field(default_factory=list)
    # The controller's TUF repository (``keys_dir`` makes it): None, no targets published.
    repo: Repository | None = None
    yank_requests: list[Any] = field(default_factory=list)
    rotate_requests: list[Any] = field(default_factory=list)
    # API tokens the controller admits, secret -> role; None admits every call (``_Gate``).
    secrets: dict[str, str] | None = None
    # After the first call to this method every token is refused (expired, or revoked).
    revoke_after: str | None = None
    # Every call that arrived: its method and the values of its authorization metadata.
    calls: list[tuple[str, list[str]]] = field(default_factory=list)
    tokens: list[Any] = field(default_factory=list)
    token_requests: list[Any] = field(default_factory=list)
    audit: list[Any] = field(default_factory=list)  # newest first
    audit_requests: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _maybe_unavailable(self, method: str, context: Any) -> None:
        with self.lock:
            left = self.unavailable.get(method, 0)
            self.unavailable[method] = max(0, left - 1)
        if left:
            context.abort(self.unavailable_code, "controller is restarting")

    def ListGateways(self, request: Any, context: Any) -> Any:
        self._maybe_unavailable("ListGateways", context)
        return controller_pb2.ListGatewaysResponse(gateways=self.gateways)

    def ListReleases(self, request: Any, context: Any) -> Any:
        if self.crash:
            raise RuntimeError("database is on fire")  # grpc answers UNKNOWN
        return controller_pb2.ListReleasesResponse(releases=self.releases)

    def SyncReleases(self, request: Any, context: Any) -> Any:
        if self.feed is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this controller has no release feed to check"
            )
        known = {r.version for r in self.releases}
        imported = [r for r in self.feed if r.version not in known]
        self.releases = sorted(
            [*self.releases, *imported], key=lambda r: _semver(r.version), reverse=True
        )
        return controller_pb2.SyncReleasesResponse(imported=imported)

    def PublishRelease(self, request_iterator: Iterator[Any], context: Any) -> Any:
        first = next(request_iterator)
        meta = first.metadata
        data = bytearray()
        biggest = 0
        for req in request_iterator:
            data += req.chunk
            biggest = max(biggest, len(req.chunk))
        self.published.append((meta, bytes(data), biggest))
        if not meta.targets_metadata:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"release {meta.version} comes without signed targets metadata: sign it where "
                "it is built (upgradectl releases publish --keys DIR, or a targets file in the "
                "release feed); the controller holds no targets key and cannot sign it",
            )
        if meta.version == "1.1.0":
            context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                "release 1.1.0 is already published with another digest",
            )
        sha256 = hashlib.sha256(data).hexdigest()
        targets = self._take(meta.targets_metadata, context)
        listed = targets.targets.get(target_name(meta.version))
        if listed is None or (listed.length, listed.hashes["sha256"]) != (len(data), sha256):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "targets do not sign the upload")
        return controller_pb2.Release(
            version=meta.version,
            sha256=sha256,
            size=len(data),
            published_at=_ts(),
            notes=meta.notes,
            signing="SIGNED",
        )

    def _take(self, targets: bytes, context: Any) -> Any:
        """Publish ``targets`` in the repository, as the controller does; its Targets."""
        assert self.repo is not None, "a test publishing signed targets uses keys_dir"
        try:
            self.repo.accept_targets(targets)
        except TrustError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"targets metadata refused: {exc}")
        return self.repo.targets()

    def GetTargetsMetadata(self, request: Any, context: Any) -> Any:
        data = self.repo.targets_bytes() if self.repo is not None else None
        targets = self.repo.targets() if self.repo is not None else None
        return controller_pb2.TargetsMetadata(
            data=data or b"", version=targets.version if targets else 0
        )

    def YankRelease(self, request: Any, context: Any) -> Any:
        self.yank_requests.append(request)
        known = {r.version for r in self.releases} | {m.version for m, _, _ in self.published}
        if request.version not in known:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no release {request.version} to yank")
        targets = self._take(request.targets_metadata, context)
        if target_name(request.version) in targets.targets:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the targets still list it")
        return controller_pb2.Release(version=request.version, signing="YANKED")

    def RotateRoot(self, request: Any, context: Any) -> Any:
        self.rotate_requests.append(request)
        self._maybe_unavailable("RotateRoot", context)
        assert self.repo is not None
        try:
            version = self.repo.accept_root(request.root, request.targets_metadata or None)
        except TrustError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"root metadata refused: {exc}")
        return controller_pb2.RotateRootResponse(root_version=version)

    def _plan(self, request: Any, context: Any) -> Any:
        """The controller's planner in small: release, then each chosen gateway's change."""
        if request.WhichOneof("target") == "latest":
            release = self.releases[0]
        else:
            release = next((r for r in self.releases if r.version == request.version), None)
            if release is None:
                available = ", ".join(r.version for r in self.releases)
                context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"unknown version {request.version}; available: {available}",
                )
        chosen = list(request.gateway_ids) or sorted(self.fleet)
        unknown = [gid for gid in chosen if gid not in self.fleet]
        if unknown:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown gateway(s): {', '.join(unknown)}")
        planned = []
        for gid in chosen:
            version, sessions = self.fleet[gid]
            if version == release.version:
                action = "NOTHING"
            elif _semver(release.version) < _semver(version):
                action = "DOWNGRADE"
            else:
                action = "UPGRADE"
            planned.append(
                controller_pb2.PlannedGateway(
                    gateway_id=gid, from_version=version, action=action, vpn_sessions=sessions
                )
            )
        changing = [g for g in planned if g.action != "NOTHING"]
        affected = sum(g.vpn_sessions for g in changing) if release.restarts_vpn_service else 0
        return controller_pb2.UpgradePlan(
            release=release, gateways=planned, vpn_sessions_affected=affected
        )

    def PlanUpgrade(self, request: Any, context: Any) -> Any:
        self.plan_requests.append(request)
        return self._plan(request, context)

    def StartUpgrade(self, request: Any, context: Any) -> Any:
        self.start_requests.append(request)
        if self.stall is not None:
            self.stall.wait(timeout=30)
        if self.crash:
            raise RuntimeError("database is on fire")  # grpc answers UNKNOWN
        self._maybe_unavailable("StartUpgrade", context)
        # The real controller's refusals: a request the CLI got wrong is refused here too.
        plan = self._plan(request, context)
        refuse = functools.partial(context.abort, grpc.StatusCode.FAILED_PRECONDITION)
        if all(g.action == "NOTHING" for g in plan.gateways):
            refuse("nothing to do")
        if any(g.action == "DOWNGRADE" for g in plan.gateways) and not request.allow_downgrade:
            refuse("a downgrade needs --allow-downgrade")
        if plan.release.restarts_vpn_service and not request.accept_vpn_disruption:
            refuse("the release restarts the VPN service: confirm the disruption")
        return self.started

    def ListJobs(self, request: Any, context: Any) -> Any:
        return controller_pb2.ListJobsResponse(jobs=self.jobs)

    def ListRejectedJobs(self, request: Any, context: Any) -> Any:
        return controller_pb2.ListRejectedJobsResponse(jobs=self.rejected)

    def AddAdmin(self, request: Any, context: Any) -> Any:
        if "@" not in request.email:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid email address {request.email!r}: expected e.g. ops@example.com",
            )
        email = request.email.strip().lower()
        if email not in self.admins:
            self.admins.append(email)
        return controller_pb2.Admin(email=email)

    def RemoveAdmin(self, request: Any, context: Any) -> Any:
        email = request.email.strip().lower()
        if email not in self.admins:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"{email} is not an admin; `upgradectl admins list` shows who is",
            )
        self.admins.remove(email)
        return controller_pb2.Admin(email=email)

    def ListAdmins(self, request: Any, context: Any) -> Any:
        admins = [controller_pb2.Admin(email=a) for a in sorted(self.admins)]
        return controller_pb2.ListAdminsResponse(admins=admins)

    def CreateToken(self, request: Any, context: Any) -> Any:
        self.token_requests.append(request)
        self._maybe_unavailable("CreateToken", context)
        if any(t.name == request.name for t in self.tokens):
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"token {request.name} exists already")
        token = controller_pb2.Token(
            name=request.name, role=request.role, created_at=_ts(), created_by="token:root"
        )
        if request.expires_seconds:
            token.expires_at.FromSeconds(int(T0.timestamp()) + request.expires_seconds)
        self.tokens.append(token)
        return controller_pb2.CreatedToken(token=token, secret=SECRET)

    def ListTokens(self, request: Any, context: Any) -> Any:
        return controller_pb2.ListTokensResponse(tokens=self.tokens)

    def RevokeToken(self, request: Any, context: Any) -> Any:
        self.token_requests.append(request)
        for token in self.tokens:
            if token.name == request.name:
                token.revoked_at.FromSeconds(int(T0.timestamp()) + 3600)
                return token
        context.abort(grpc.StatusCode.NOT_FOUND, f"no token named {request.name}")

    def ListAudit(self, request: Any, context: Any) -> Any:
        self.audit_requests.append(request)
        since = request.since.seconds if request.HasField("since") else 0
        return controller_pb2.ListAuditResponse(
            events=[e for e in self.audit if e.at.seconds >= since]
        )

    def GetJob(self, request: Any, context: Any) -> Any:
        self.job_requests.append(request)
        known = {"", "job-1", *(j.job_id for j in (self.started, self.final) if j is not None)}
        if request.job_id not in known:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id}")
        return self.final if self.watch_requests or self.started is None else self.started

    def WatchJob(self, request: Any, context: Any) -> Iterator[Any]:
        with self.lock:
            call = len(self.watch_requests)
            self.watch_requests.append(request)
        self._maybe_unavailable("WatchJob", context)
        if self.watch_opens:
            context.send_initial_metadata((api.WATCH_OPEN,))
        cut_after = self.cut_watch_after if call == 0 else None
        if call < len(self.cut_plan):
            cut_after = self.cut_plan[call]
        sent = 0
        for event in self.events:
            if event.seq <= request.after_seq:
                continue
            if sent == cut_after:
                threading.Event().wait(self.quiet_before_cut_s)  # simulates a slow hand-over
                context.abort(self.cut_code, "controller is restarting")
            yield event
            sent += 1


# The roles a call needs at the fake's gate; the real controller's table is in controller_svc.
ADMIN_METHODS = frozenset({"CreateToken", "ListTokens", "RevokeToken", "ListAudit"})
ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}


class _Gate(grpc.ServerInterceptor):  # type: ignore[misc]
    """Records every call's authorization metadata, and, once the fake has tokens, admits
    a call as the controller does: UNAUTHENTICATED without a known token, PERMISSION_DENIED
    when its role is too low."""

    def __init__(self, fake: FakeController) -> None:
        self.fake = fake

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        method = details.method.rsplit("/", 1)[-1]
        sent = [value for key, value in details.invocation_metadata if key == "authorization"]
        with self.fake.lock:
            self.fake.calls.append((method, sent))
        handler = continuation(details)
        refusal = self._refusal(method, sent)
        if method == self.fake.revoke_after:
            self.fake.secrets = {}
        if refusal is None:
            return handler

        def deny(request: Any, context: Any) -> Any:
            context.abort(*refusal)

        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return make(
            deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _refusal(self, method: str, sent: list[str]) -> tuple[grpc.StatusCode, str] | None:
        if self.fake.secrets is None:
            return None
        if not sent:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "this call needs an API token: give it in HITLESS_TOKEN or a --token-file",
            )
        role = self.fake.secrets.get(sent[0].removeprefix("Bearer "))
        if role is None:
            return (grpc.StatusCode.UNAUTHENTICATED, "unknown API token")
        needed = "admin" if method in ADMIN_METHODS else "viewer"
        if ROLE_RANK[role] < ROLE_RANK[needed]:
            reason = f"{method} needs the {needed} role; this token has the {role} role"
            return grpc.StatusCode.PERMISSION_DENIED, reason
        return None


@pytest.fixture
def fake() -> FakeController:
    return FakeController()


@pytest.fixture
def keys_dir(tmp_path: Path, fake: FakeController) -> Path:
    """A key directory (``keys init``) whose root and online keys the fake controller's
    repository trusts and holds, as ``controller-svc serve --trust-root DIR/root.json``."""
    paths = trust_keys.init(tmp_path / "keys")
    fake.repo = Repository(tmp_path / "repo", paths.root_json.read_bytes(), paths.online)
    return paths.dir


class Address(str):
    """HOST:PORT of a controller, with the CA certificate (file) its TLS port chains to."""

    ca_cert: Path

    def __new__(cls, value: str, ca_cert: Path) -> Address:
        address = super().__new__(cls, value)
        address.ca_cert = ca_cert
        return address


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """The CA of the fake controller's TLS port."""
    return certificates.certificate_authority(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def ca_cert(tls_ca: CertificateAuthority) -> Path:
    """What an operator gives upgradectl as --ca-cert (the controller's pki/ca.pem)."""
    return tls_ca.ca_path


@pytest.fixture
def addr(fake: FakeController, tls_ca: CertificateAuthority) -> Iterator[Address]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[_Gate(fake)])
    controller_pb2_grpc.add_ControllerServicer_to_server(fake, server)
    credentials = tls_ca.server_credentials(require_client_certificate=False)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield Address(f"127.0.0.1:{port}", tls_ca.ca_path)
    finally:
        server.stop(grace=None).wait()


def cli(
    addr: str,
    *args: str,
    stdin: io.StringIO | None = None,
    call_timeout: float = 10.0,
    env: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    """Run upgradectl's real entry point against ``addr``; exit code, stdout, stderr.

    Standard input is not a terminal unless the test passes one (``_Terminal``). The
    environment is ``env`` alone (default: empty), never the test process's, and
    HITLESS_CA_CERT when ``addr`` is an ``Address`` (unless ``env`` sets it).
    """
    out, err = io.StringIO(), io.StringIO()
    tls = {ENV_CA_CERT: str(addr.ca_cert)} if isinstance(addr, Address) else {}
    code = run(
        ["--controller", addr, *args],
        env={**tls, **(env or {})},
        out=out,
        err=err,
        retry=FAST_RETRY,
        stdin=io.StringIO() if stdin is None else stdin,
        call_timeout=call_timeout,
    )
    return code, out.getvalue(), err.getvalue()


def ok(addr: str, *args: str) -> str:
    """``cli`` for a command that must succeed: exit 0, nothing on stderr; its stdout."""
    code, out, err = cli(addr, *args)
    assert (code, err) == (ExitCode.OK, ""), f"exit {code}: {err}"
    return out


def _running_job(fake: FakeController, *, gw2_final: int, gw2_error: str = "") -> None:
    fake.started = _job(
        JS.JOB_STATE_PENDING,
        [("gw-1", GS.GATEWAY_JOB_STATE_QUEUED, ""), ("gw-2", GS.GATEWAY_JOB_STATE_QUEUED, "")],
    )
    job_final = (
        JS.JOB_STATE_SUCCEEDED
        if gw2_final == GS.GATEWAY_JOB_STATE_SUCCEEDED
        else JS.JOB_STATE_PARTIAL
    )
    fake.final = _job(
        job_final, [("gw-1", GS.GATEWAY_JOB_STATE_SUCCEEDED, ""), ("gw-2", gw2_final, gw2_error)]
    )
    fake.events = [
        _event(1, jstate=JS.JOB_STATE_RUNNING),
        _event(2, "gw-1", GS.GATEWAY_JOB_STATE_DOWNLOADING, bytes_done=50, bytes_total=100),
        _event(3, "gw-2", GS.GATEWAY_JOB_STATE_DOWNLOADING, bytes_done=100, bytes_total=100),
        _event(4, "gw-1", GS.GATEWAY_JOB_STATE_SUCCEEDED),
        _event(5, "gw-2", gw2_final, error=gw2_error),
        _event(6, jstate=job_final),
    ]


def test_gateways_list_json_shape(addr: str) -> None:
    code, out, err = cli(addr, "gateways", "list", "--json")
    assert (code, err) == (ExitCode.OK, "")
    assert json.loads(out) == [
        {
            "id": "gw-1",
            "version": "1.1.0",
            "state": "ONLINE",
            "last_seen": "2025-03-01T12:00:00Z",
            "vpn_sessions": 0,
        },
        {
            "id": "gw-22",
            "version": "1.0.0",
            "state": "OFFLINE",
            "last_seen": None,
            "vpn_sessions": 0,
        },
    ]


def test_gateways_list_table(addr: str) -> None:
    code, out, _ = cli(addr, "gateways", "list")
    lines = out.splitlines()
    assert code == ExitCode.OK
    assert lines[0] == "ID     VERSION  STATE    VPN USERS  LAST SEEN"
    assert lines[1].startswith("gw-1   1.1.0    ONLINE   0          ") and lines[1].endswith(" ago")
    assert lines[2] == "gw-22  1.0.0    OFFLINE  0          never"


def test_releases_list_json_and_table(addr: str) -> None:
    code, out, _ = cli(addr, "releases", "list", "--json")
    assert code == ExitCode.OK
    assert json.loads(out)[0] == {
        "version": "1.2.0",
        "sha256": "ab" * 32,
        "size": 3 * 2**20,
        "published_at": "2025-03-01T12:00:00Z",
        "notes": "Faster rekeying.\nMore.",
        "restarts_vpn_service": False,
        "signing": "SIGNED",
        "min_from": None,
    }
    assert [r["version"] for r in json.loads(out)] == ["1.2.0", "1.1.0"]
    out = ok(addr, "releases", "list")
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [
        ["1.2.0", "3.0", "MiB"],
        ["1.1.0", "900", "B"],
    ]
    assert out.splitlines()[1].endswith("Faster rekeying.")


def test_unknown_version_is_rejected_with_the_servers_words(
    addr: str, fake: FakeController
) -> None:
    code, out, err = cli(addr, "upgrade", "--version", "9.9.9", "--yes")
    assert code == ExitCode.REJECTED
    assert out == ""
    assert err == "upgradectl: error: unknown version 9.9.9; available: 1.2.0, 1.1.0\n"


def test_upgrade_json_without_waiting(addr: str, fake: FakeController) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    code, out, _ = cli(addr, "upgrade", "--latest", "--gateways", "gw-1, gw-2,", "--json")
    assert code == ExitCode.OK
    assert json.loads(out) == {
        "job_id": "job-1",
        "target_version": "1.2.0",
        "state": "PENDING",
        "gateways": [
            {
                "id": g,
                "state": "QUEUED",
                "from_version": "1.1.0",
                "to_version": "1.2.0",
                "error": None,
                "vpn_sessions_dropped": 0,
                "path": None,
                "hop": None,
                "health": None,
            }
            for g in ("gw-1", "gw-2")
        ],
    }
    (plan,) = fake.plan_requests
    assert plan.WhichOneof("target") == "latest" and plan.latest
    (request,) = fake.start_requests
    # The job starts the release the plan showed, not whatever is latest a moment later.
    assert request.WhichOneof("target") == "version" and request.version == "1.2.0"
    assert list(request.gateway_ids) == ["gw-1", "gw-2"]
    assert not request.allow_downgrade and not request.accept_vpn_disruption
    assert request.deadline_seconds == 0
    assert uuid.UUID(request.request_id).version == 4
    assert fake.watch_requests == []


def test_upgrade_wait_exits_zero_when_every_gateway_succeeded(
    addr: str, fake: FakeController
) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    code, out, err = cli(addr, "upgrade", "--version", "1.2.0", "--wait", "--json")
    assert code == ExitCode.OK
    assert err.startswith("plan: install release 1.2.0")  # for people, beside the JSON
    data = json.loads(out)
    assert data["state"] == "SUCCEEDED"
    assert [g["state"] for g in data["gateways"]] == ["SUCCEEDED", "SUCCEEDED"]
    assert [(r.job_id, r.after_seq) for r in fake.watch_requests] == [("job-1", 0)]
    assert [r.job_id for r in fake.job_requests] == ["job-1"]


def test_upgrade_wait_exits_one_when_a_gateway_failed(addr: str, fake: FakeController) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_FAILED, gw2_error="sha256 mismatch")
    code, out, err = cli(addr, "upgrade", "--latest", "--wait", "--json")
    assert code == ExitCode.JOB_NOT_SUCCEEDED
    data = json.loads(out)
    assert data["state"] == "PARTIAL"
    assert data["gateways"][1] == {
        "id": "gw-2",
        "state": "FAILED",
        "from_version": "1.1.0",
        "to_version": "1.2.0",
        "error": "sha256 mismatch",
        "vpn_sessions_dropped": 0,
        "path": None,
        "hop": None,
        "health": None,
    }
    assert err.splitlines(keepends=True)[-1] == (
        "upgradectl: error: job job-1 ended PARTIAL: gw-2 FAILED (sha256 mismatch); "
        "see upgradectl status job-1\n"
    )


def test_upgrade_wait_for_people_prints_one_line_per_event(addr: str, fake: FakeController) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    code, out, _ = cli(addr, "upgrade", "--latest", "--wait")
    assert code == ExitCode.OK
    lines = out.splitlines()
    lines = lines[lines.index("watching job job-1 (target 1.2.0, PENDING)") :]
    assert lines[1:7] == [
        "12:00:01  job RUNNING",
        "12:00:02  gw-1  DOWNLOADING  50% of 100 B",
        "12:00:03  gw-2  DOWNLOADING  100% of 100 B",
        "12:00:04  gw-1  SUCCEEDED",
        "12:00:05  gw-2  SUCCEEDED",
        "12:00:06  job SUCCEEDED",
    ]
    assert lines[7] == "job job-1  target 1.2.0  SUCCEEDED  (2/2 gateways succeeded)"
    assert "\x1b" not in out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_watch_on_a_terminal_redraws_the_table(addr: Address, fake: FakeController) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    out, err = _Terminal(), io.StringIO()
    code = run(
        ["--controller", addr, "status", "--watch"],
        env={ENV_CA_CERT: str(addr.ca_cert)},
        out=out,
        err=err,
        retry=FAST_RETRY,
    )
    assert (code, err.getvalue()) == (ExitCode.OK, "")
    frames = out.getvalue().split("\x1b[J")
    # A first frame, one per event, and the final picture; each after moving up 4 lines.
    assert len(frames) == 1 + 1 + len(fake.events) + 1
    assert all(frame.endswith("\x1b[4F") for frame in frames[2:-1])
    assert frames[-1].startswith("job job-1  target 1.2.0  SUCCEEDED  (2/2")
    assert "50%" in frames[3]


def test_status_without_job_shows_the_most_recent(addr: str, fake: FakeController) -> None:
    fake.final = _job(
        JS.JOB_STATE_FAILED,
        [("gw-1", GS.GATEWAY_JOB_STATE_ROLLED_BACK, "new version missed its ready deadline")],
    )
    code, out, _ = cli(addr, "status", "--json")
    assert code == ExitCode.OK  # a query: the job's outcome is in the output, not the code
    assert list(json.loads(out)) == ["job_id", "state", "target_version", "gateways"]
    assert json.loads(out)["gateways"][0]["state"] == "ROLLED_BACK"
    assert [r.job_id for r in fake.job_requests] == [""]

    out = ok(addr, "status")
    assert out.splitlines()[0] == "job job-1  target 1.2.0  FAILED  (0/1 gateways succeeded)"
    assert out.splitlines()[2].endswith("new version missed its ready deadline")


def test_status_of_an_unknown_job_is_rejected(addr: str) -> None:
    code, _, err = cli(addr, "status", "nope")
    assert (code, err) == (ExitCode.REJECTED, "upgradectl: error: no job nope\n")


@pytest.mark.parametrize("cut", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_watch_cut_midway_resumes_after_the_last_event(
    addr: str, fake: FakeController, cut: grpc.StatusCode
) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    fake.cut_watch_after = 3
    fake.cut_code = cut
    code, out, err = cli(addr, "upgrade", "--latest", "--wait")
    assert (code, err) == (ExitCode.OK, "")
    assert [r.after_seq for r in fake.watch_requests] == [0, 3]
    event_lines = [line for line in out.splitlines() if line.startswith("12:00:")]
    assert [line.split()[0] for line in event_lines] == [f"12:00:0{i}" for i in range(1, 7)]


def test_a_watch_quiet_for_longer_than_the_retry_budget_still_resumes(
    addr: str, fake: FakeController
) -> None:
    """A controller that upgrades itself is quiet for a while, then ends the watch: the
    retry budget starts at the cut, so the client reopens the watch instead of giving up."""
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    fake.cut_watch_after = 3
    fake.quiet_before_cut_s = FAST_RETRY.budget_s + 0.3
    code, _, err = cli(addr, "upgrade", "--latest", "--wait")
    assert (code, err) == (ExitCode.OK, "")
    assert [r.after_seq for r in fake.watch_requests] == [0, 3]


@pytest.mark.parametrize("opens", [True, False])
def test_a_watch_cut_twice_each_after_a_quiet_spell_resumes_when_the_controller_took_it(
    addr: str, fake: FakeController, opens: bool
) -> None:
    """Two cuts, each after a stream quiet for longer than the retry budget: a stream the
    controller took (WATCH_OPEN) starts the budget again, so the second cut is retried.
    From a controller that does not say so (an older one), the second cut ends the watch."""
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    fake.cut_plan = [3, 0]  # the second stream is cut before it sends anything
    fake.quiet_before_cut_s = FAST_RETRY.budget_s + 0.3
    fake.watch_opens = opens
    code, _, err = cli(addr, "upgrade", "--latest", "--wait")
    if opens:
        assert (code, err) == (ExitCode.OK, "")
        assert [r.after_seq for r in fake.watch_requests] == [0, 3, 3]
    else:
        assert code == ExitCode.UNREACHABLE
        assert [r.after_seq for r in fake.watch_requests] == [0, 3]


def test_status_watch_of_a_finished_job_does_not_watch(addr: str, fake: FakeController) -> None:
    fake.final = _job(JS.JOB_STATE_SUCCEEDED, [("gw-1", GS.GATEWAY_JOB_STATE_SUCCEEDED, "")])
    code, out, _ = cli(addr, "status", "job-1", "--watch", "--json")
    assert code == ExitCode.OK
    assert json.loads(out)["state"] == "SUCCEEDED"
    assert fake.watch_requests == []


def test_start_upgrade_retries_unavailable_with_the_same_request_id(
    addr: str, fake: FakeController
) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    fake.unavailable["StartUpgrade"] = 2
    code, out, err = cli(addr, "upgrade", "--latest", "--json")
    assert code == ExitCode.OK, err
    assert json.loads(out)["job_id"] == "job-1"
    ids = {r.request_id for r in fake.start_requests}
    assert len(fake.start_requests) == 3 and len(ids) == 1


def test_a_call_cancelled_by_a_stopping_controller_is_retried(
    addr: str, fake: FakeController
) -> None:
    fake.unavailable_code = grpc.StatusCode.CANCELLED
    fake.unavailable["ListGateways"] = 2
    code, out, err = cli(addr, "gateways", "list", "--json")
    assert code == ExitCode.OK, err
    assert [g["id"] for g in json.loads(out)] == ["gw-1", "gw-22"]
    assert fake.unavailable["ListGateways"] == 0


def test_a_busy_controller_is_retried_then_reported_with_its_words(
    addr: str, fake: FakeController
) -> None:
    fake.unavailable_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    fake.unavailable["ListGateways"] = 2
    code, out, err = cli(addr, "gateways", "list", "--json")
    assert code == ExitCode.OK, err
    assert [g["id"] for g in json.loads(out)] == ["gw-1", "gw-22"]
    fake.unavailable["ListGateways"] = 1000
    code, _, err = cli(addr, "gateways", "list")
    assert code == ExitCode.UNREACHABLE
    assert err == (
        f"upgradectl: error: the controller at {addr} turned the call away: "
        "controller is restarting\n"
    )


def test_unavailable_beyond_the_retry_budget_is_unreachable(
    addr: str, fake: FakeController
) -> None:
    fake.unavailable["ListGateways"] = 1000
    code, _, err = cli(addr, "gateways", "list")
    assert code == ExitCode.UNREACHABLE
    assert f"cannot reach the controller at {addr}: controller is restarting;" in err


def test_publish_streams_the_file_in_chunks_with_its_digest(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    artifact = tmp_path / "hitless.pyz"
    payload = os.urandom(2 * CHUNK_SIZE + 12345)
    artifact.write_bytes(payload)
    notes = tmp_path / "NOTES"
    notes.write_text("Restarts the VPN service.\n", encoding="utf-8")
    code, out, err = cli(
        addr,
        "releases",
        "publish",
        "--version",
        "1.3.0",
        "--artifact",
        str(artifact),
        "--notes",
        str(notes),
        "--keys",
        str(keys_dir),
    )
    assert (code, err) == (ExitCode.OK, "")
    ((meta, received, biggest),) = fake.published
    assert received == payload
    assert biggest == CHUNK_SIZE
    assert (meta.version, meta.notes) == ("1.3.0", "Restarts the VPN service.\n")
    assert (meta.sha256, meta.size) == (hashlib.sha256(payload).hexdigest(), len(payload))
    assert out == (
        f"published 1.3.0: 524.1 KiB, sha256 {meta.sha256}\n"
        "signing: SIGNED (targets version 1 lists hitless-1.3.0.pyz)\n"
    )


def test_publish_refused_and_missing_artifact(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    artifact = tmp_path / "a.pyz"
    artifact.write_bytes(b"zip")
    code, _, err = cli(
        addr,
        "releases",
        "publish",
        "--version",
        "1.1.0",
        "--artifact",
        str(artifact),
        "--keys",
        str(keys_dir),
    )
    assert code == ExitCode.REJECTED
    assert err == "upgradectl: error: release 1.1.0 is already published with another digest\n"
    code, _, err = cli(
        addr,
        "releases",
        "publish",
        "--version",
        "1.1.0",
        "--artifact",
        str(tmp_path / "missing.pyz"),
        "--keys",
        str(keys_dir),
    )
    assert code == ExitCode.USAGE
    assert "no artifact at" in err
    assert len(fake.published) == 1


def test_controller_failure_is_internal(addr: str, fake: FakeController) -> None:
    fake.crash = True
    code, _, err = cli(addr, "releases", "list")
    assert code == ExitCode.INTERNAL
    assert err.startswith(f"upgradectl: error: the controller failed on ListReleases at {addr}: ")


def test_no_controller_listening_is_unreachable_with_a_hint(ca_cert: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    port = free_port()  # nothing listens there
    # The address comes from the environment when --controller is absent.
    code = run(
        ["gateways", "list"],
        env={ENV_CONTROLLER: f"127.0.0.1:{port}", ENV_CA_CERT: str(ca_cert)},
        out=out,
        err=err,
        retry=FAST_RETRY,
    )
    assert code == ExitCode.UNREACHABLE
    message = err.getvalue()
    assert message.startswith(
        f"upgradectl: error: cannot reach the controller at 127.0.0.1:{port}: "
    )
    assert message.endswith(
        "; is controller-svc running? (set --controller or HITLESS_CONTROLLER)\n"
    )


def test_main_reads_the_environment(
    addr: Address, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_CONTROLLER, addr)
    monkeypatch.setenv(ENV_CA_CERT, str(addr.ca_cert))
    assert main(["gateways", "list", "--json"]) == ExitCode.OK
    assert [g["id"] for g in json.loads(capsys.readouterr().out)] == ["gw-1", "gw-22"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--controller", "nohost", "gateways", "list"], "invalid controller address 'nohost'"),
        (["upgrade", "--gateways", "gw-1"], "one of the arguments --latest --version is required"),
        (["upgrade", "--latest", "--version", "1.2.0"], "not allowed with argument"),
        (["upgrade", "--latest", "--gateways", " , "], "--gateways needs at least one gateway id"),
        (["upgrade", "--latest", "--deadline", "0"], "expected 1 to 2592000 seconds, not 0"),
        (
            ["upgrade", "--latest", "--deadline", "2592001"],
            "expected 1 to 2592000 seconds, not 2592001",
        ),
        (
            ["upgrade", "--latest", "--gateways", "gw-1," + "x" * 250],
            "--gateways: invalid gateway id 'xxxx",
        ),
        (["upgrade", "--latest", "--gateways", "gw.1"], "use 1-64 ASCII letters, digits"),
        (["upgrade", "--latest", "--deadline", "soon"], "expected whole seconds, e.g. 600"),
        (["admins", "add"], "the following arguments are required: EMAIL"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        # A mistyped option is named before the required one it leaves out.
        (["upgrade", "--lastest"], "unrecognized argument --lastest (did you mean --latest?)"),
        (["admins", "add", "--emial"], "unrecognized argument --emial"),
        (["releases", "--foo"], "unrecognized argument --foo"),
        (["upgrade", "--version", "banana"], "argument --version: invalid version 'banana'"),
        (["releases", "yank", "1.x", "--keys", "k"], "argument V: invalid version '1.x'"),
    ],
)
def test_usage_errors(args: list[str], expected: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = run(args, env={}, out=out, err=err, retry=FAST_RETRY)
    assert code == ExitCode.USAGE
    assert expected in err.getvalue()
    assert "upgradectl: error: " in err.getvalue()


@pytest.mark.parametrize(
    ("args", "usage", "expected"),
    [
        (
            ["upgrade", "--latest", "--wiat"],
            "usage: upgradectl upgrade ",
            "--wiat (did you mean --wait?)",
        ),
        (
            ["status", "job-1", "extra"],
            "usage: upgradectl status ",
            "unrecognized arguments: extra",
        ),
        (
            ["releases", "list", "--jsn"],
            "usage: upgradectl releases list ",
            "--jsn (did you mean --json?)",
        ),
        (
            ["upgrade", "--latest", "--controller", "h:1"],
            "usage: upgradectl upgrade ",
            "--controller is an option of upgradectl itself: give it before the command",
        ),
    ],
)
def test_an_unknown_argument_is_shown_with_its_commands_usage(
    args: list[str], usage: str, expected: str
) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = run(args, env={}, out=out, err=err, retry=FAST_RETRY)
    assert code == ExitCode.USAGE
    assert err.getvalue().startswith(usage), err.getvalue()
    assert expected in err.getvalue()


def test_python_dash_m_runs_the_cli_without_tracebacks(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "upgradectl", "--controller", "bad", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr.startswith("upgradectl: error: invalid controller address 'bad'")
    assert "Traceback" not in proc.stderr


# --- Upgrade plans: what the operator sees and agrees to before a job exists -------------


class _NoAnswer(io.StringIO):
    """A terminal nobody should be asked on: reading it fails the test."""

    def isatty(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> str:
        raise AssertionError("upgradectl asked a question it should not have")


def _vpn_release(fake: FakeController) -> None:
    fake.releases[0] = _release("1.2.0", notes="Restarts the VPN service.\nNew ciphers.", vpn=True)


def test_upgrade_shows_the_plan_with_notes_before_starting(addr: str, fake: FakeController) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    fake.fleet["gw-3"] = ("1.2.0", 0)
    code, out, err = cli(addr, "upgrade", "--latest", stdin=_NoAnswer())
    assert (code, err) == (ExitCode.OK, "")
    lines = out.splitlines()
    assert lines[:8] == [
        "plan: install release 1.2.0 (published 2025-03-01 12:00 UTC)",
        "release notes:",
        "  Faster rekeying.",
        "  More.",
        "",
        "GATEWAY  FROM   TO     ACTION",
        "gw-1     1.1.0  1.2.0  UPGRADE",
        "gw-2     1.1.0  1.2.0  UPGRADE",
    ]
    assert lines[8] == "gw-3     1.2.0  1.2.0  NOTHING"
    assert lines[10].startswith("job job-1  target 1.2.0  PENDING")
    (request,) = fake.start_requests
    assert list(request.gateway_ids) == ["gw-1", "gw-2", "gw-3"]
    assert not request.accept_vpn_disruption  # no VPN restart, so nothing to accept


def test_upgrade_json_keeps_the_plan_on_stderr(addr: str, fake: FakeController) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    code, out, err = cli(addr, "upgrade", "--version", "1.2.0", "--deadline", "90", "--json")
    assert code == ExitCode.OK
    assert json.loads(out)["job_id"] == "job-1"
    assert "  Faster rekeying." in err.splitlines()
    assert fake.start_requests[0].deadline_seconds == 90


@pytest.mark.parametrize("json_flag", [False, True])
def test_nothing_to_do_starts_nothing(addr: str, fake: FakeController, json_flag: bool) -> None:
    fake.fleet = {"gw-1": ("1.2.0", 0), "gw-2": ("1.2.0", 4)}
    args = ["upgrade", "--latest", "--yes"] + (["--json"] if json_flag else [])
    code, out, err = cli(addr, *args)
    assert code == ExitCode.OK
    message = "nothing to do: every chosen gateway already runs 1.2.0"
    if json_flag:
        assert json.loads(out) == {
            "job_id": None,
            "target_version": "1.2.0",
            "state": "NOTHING_TO_DO",
            "gateways": [],
        }
        assert err.splitlines()[-1] == message
    else:
        assert (out.splitlines()[-1], err) == (message, "")
    assert len(fake.plan_requests) == 1
    assert fake.start_requests == []


def test_downgrade_is_refused_without_allow_downgrade(addr: str, fake: FakeController) -> None:
    fake.fleet["gw-2"] = ("1.3.0", 0)
    code, out, err = cli(addr, "upgrade", "--version", "1.2.0", "--yes")
    assert code == ExitCode.REJECTED
    assert "gw-2     1.3.0  1.2.0  DOWNGRADE" in out.splitlines()
    assert err == (
        "upgradectl: error: release 1.2.0 would downgrade gw-2 from 1.3.0; nothing was "
        "started: add --allow-downgrade to downgrade on purpose\n"
    )
    assert fake.start_requests == []


def test_downgrade_proceeds_with_allow_downgrade(addr: str, fake: FakeController) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    fake.fleet["gw-2"] = ("1.3.0", 0)
    code, _, err = cli(addr, "upgrade", "--version", "1.2.0", "--allow-downgrade", "--json")
    assert code == ExitCode.OK, err
    (request,) = fake.start_requests
    assert request.allow_downgrade and not request.accept_vpn_disruption


def test_vpn_release_with_yes_warns_and_accepts(addr: str, fake: FakeController) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    _vpn_release(fake)
    code, out, err = cli(addr, "upgrade", "--latest", "--yes", stdin=_NoAnswer())
    assert (code, err) == (ExitCode.OK, "")
    lines = out.splitlines()
    assert lines[5:8] == [
        "GATEWAY  FROM   TO     ACTION   VPN USERS",
        "gw-1     1.1.0  1.2.0  UPGRADE  3",
        "gw-2     1.1.0  1.2.0  UPGRADE  5",
    ]
    assert "!! WARNING: release 1.2.0 restarts the VPN service." in lines
    assert "!! 8 VPN user(s) connected now to gw-1, gw-2 will be disconnected." in lines
    assert "Proceed?" not in out
    (request,) = fake.start_requests
    assert request.accept_vpn_disruption


def test_vpn_release_without_a_terminal_or_yes_is_refused(addr: str, fake: FakeController) -> None:
    _vpn_release(fake)
    code, out, err = cli(addr, "upgrade", "--latest", "--json")
    assert code == ExitCode.NEEDS_CONFIRMATION
    assert out == ""
    assert err.splitlines()[-1] == (
        "upgradectl: error: release 1.2.0 restarts the VPN service and would disconnect 8 "
        "connected VPN user(s); standard input is not a terminal to ask on, so nothing was "
        "started: add --yes to accept that"
    )
    assert "!! WARNING: release 1.2.0 restarts the VPN service." in err.splitlines()
    assert fake.start_requests == []


@pytest.mark.parametrize("answer", ["y\n", "YES\n"])
def test_vpn_release_on_a_terminal_proceeds_on_yes(
    addr: str, fake: FakeController, answer: str
) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    _vpn_release(fake)
    code, out, err = cli(addr, "upgrade", "--latest", stdin=_Terminal(answer))
    assert (code, err) == (ExitCode.OK, "")
    before, after = out.split("Proceed? [y/N] ")
    assert "!! 8 VPN user(s) connected now to gw-1, gw-2 will be disconnected." in before
    assert after.startswith("job job-1  target 1.2.0  PENDING")
    (request,) = fake.start_requests
    assert request.accept_vpn_disruption


@pytest.mark.parametrize("answer", ["n\n", "\n", "sure\n", ""])
def test_vpn_release_on_a_terminal_aborts_on_anything_else(
    addr: str, fake: FakeController, answer: str
) -> None:
    _vpn_release(fake)
    code, out, err = cli(addr, "upgrade", "--latest", stdin=_Terminal(answer))
    assert code == ExitCode.DECLINED
    assert out.endswith("Proceed? [y/N] ")
    assert err == "upgradectl: error: the upgrade to 1.2.0 was not confirmed: nothing was started\n"
    assert fake.start_requests == []


def test_vpn_question_on_a_real_terminal(
    addr: Address, fake: FakeController, tmp_path: Path
) -> None:
    """The installed entry point asks on its own stdin when that is a terminal (a pty)."""
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    _vpn_release(fake)
    controller, terminal = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "upgradectl", "--controller", addr, "upgrade", "--latest", "--json"],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, ENV_CA_CERT: str(addr.ca_cert)},
    ) as proc:
        os.close(terminal)
        assert proc.stderr is not None
        # With --json the question is on stderr; answer once it has been asked.
        asked = b""
        while not asked.endswith(b"Proceed? [y/N] "):
            ready, _, _ = select.select([proc.stderr], [], [], 30)
            chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
            assert chunk, f"no question within 30 s; stderr so far: {asked!r}"
            asked += chunk
        os.write(controller, b"y\n")
        out, _ = proc.communicate(timeout=30)
    os.close(controller)
    assert proc.returncode == ExitCode.OK
    assert json.loads(out)["job_id"] == "job-1"
    assert fake.start_requests[0].accept_vpn_disruption


# --- Status, jobs, releases and admins ------------------------------------------------------


def test_status_shows_dropped_vpn_sessions(addr: str, fake: FakeController) -> None:
    job = _job(
        JS.JOB_STATE_SUCCEEDED,
        [
            ("gw-1", GS.GATEWAY_JOB_STATE_SUCCEEDED, ""),
            ("gw-2", GS.GATEWAY_JOB_STATE_SUCCEEDED, ""),
        ],
    )
    job.gateways[1].vpn_sessions_dropped = 7
    fake.final = job
    code, out, _ = cli(addr, "status", "--json")
    assert code == ExitCode.OK
    assert [g["vpn_sessions_dropped"] for g in json.loads(out)["gateways"]] == [0, 7]
    out = ok(addr, "status")
    lines = out.splitlines()
    assert lines[1].split() == [
        "GATEWAY",
        "STATE",
        "FROM",
        "TO",
        "PROGRESS",
        "VPN",
        "DROPPED",
        "ERROR",
    ]
    assert lines[2].split() == ["gw-1", "SUCCEEDED", "1.1.0", "1.2.0"]
    assert lines[3].split() == ["gw-2", "SUCCEEDED", "1.1.0", "1.2.0", "7"]


def test_jobs_list_json_and_table(addr: str, fake: FakeController) -> None:
    management = _job(
        JS.JOB_STATE_RUNNING, [("gw-1", GS.GATEWAY_JOB_STATE_SWAPPING, "")], job_id="job-2"
    )
    management.source, management.requested_by = "management", "user-42"
    fake.jobs = [
        management,
        _job(JS.JOB_STATE_SUCCEEDED, [("gw-1", GS.GATEWAY_JOB_STATE_SUCCEEDED, "")]),
    ]
    code, out, err = cli(addr, "jobs", "list", "--json")
    assert (code, err) == (ExitCode.OK, "")
    assert json.loads(out) == [
        {
            "job_id": "job-2",
            "state": "RUNNING",
            "target_version": "1.2.0",
            "source": "management",
            "requested_by": "user-42",
            "created_at": "2025-03-01T12:00:00Z",
            "gateways": [
                {
                    "id": "gw-1",
                    "state": "SWAPPING",
                    "from_version": "1.1.0",
                    "to_version": "1.2.0",
                    "error": None,
                    "vpn_sessions_dropped": 0,
                    "path": None,
                    "hop": None,
                    "health": None,
                }
            ],
        },
        {
            "job_id": "job-1",
            "state": "SUCCEEDED",
            "target_version": "1.2.0",
            "source": "cli",
            "requested_by": None,
            "created_at": "2025-03-01T12:00:00Z",
            "gateways": [
                {
                    "id": "gw-1",
                    "state": "SUCCEEDED",
                    "from_version": "1.1.0",
                    "to_version": "1.2.0",
                    "error": None,
                    "vpn_sessions_dropped": 0,
                    "path": None,
                    "hop": None,
                    "health": None,
                }
            ],
        },
    ]
    out = ok(addr, "jobs", "list")
    assert out.splitlines() == [
        "JOB    STATE      TARGET  SOURCE      REQUESTED BY  CREATED               GATEWAYS",
        "job-2  RUNNING    1.2.0   management  user-42       2025-03-01 12:00 UTC  0/1 succeeded",
        "job-1  SUCCEEDED  1.2.0   cli         -             2025-03-01 12:00 UTC  1/1 succeeded",
    ]
    fake.jobs = []
    assert ok(addr, "jobs", "list") == "no upgrade job has run yet (upgradectl upgrade)\n"


def test_jobs_rejected_json_and_table(addr: str, fake: FakeController) -> None:
    fake.rejected = [
        controller_pb2.RejectedJob(
            message_id="m-2",
            reason="unknown version 9.9.9",
            body='{"version": "9.9.9"}',
            user_id="user-42",
            at=_ts(60),
        ),
        controller_pb2.RejectedJob(message_id="m-1", reason="not JSON", body="garbage", at=_ts()),
    ]
    code, out, err = cli(addr, "jobs", "rejected", "--json")
    assert (code, err) == (ExitCode.OK, "")
    assert json.loads(out) == [
        {
            "message_id": "m-2",
            "reason": "unknown version 9.9.9",
            "body": '{"version": "9.9.9"}',
            "user_id": "user-42",
            "at": "2025-03-01T12:01:00Z",
        },
        {
            "message_id": "m-1",
            "reason": "not JSON",
            "body": "garbage",
            "user_id": None,
            "at": "2025-03-01T12:00:00Z",
        },
    ]
    out = ok(addr, "jobs", "rejected")
    assert out.splitlines() == [
        "AT                    MESSAGE ID  USER     REASON",
        "2025-03-01 12:01 UTC  m-2         user-42  unknown version 9.9.9",
        "2025-03-01 12:00 UTC  m-1         -        not JSON",
    ]
    fake.rejected = []
    assert ok(addr, "jobs", "rejected") == "no management job has been rejected\n"


def test_releases_show_which_restart_the_vpn_service(addr: str, fake: FakeController) -> None:
    _vpn_release(fake)
    code, out, _ = cli(addr, "releases", "list", "--json")
    assert code == ExitCode.OK
    assert [r["restarts_vpn_service"] for r in json.loads(out)] == [True, False]
    out = ok(addr, "releases", "list")
    header, vpn, plain = (re.split(" {2,}", line) for line in out.splitlines())
    column = header.index("VPN")
    assert (vpn[column], plain[column]) == ("restarts", "-")


def test_publish_marks_a_release_that_restarts_the_vpn_service(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    artifact = tmp_path / "a.pyz"
    artifact.write_bytes(b"zip")
    code, _, err = cli(
        addr,
        "releases",
        "publish",
        "--version",
        "1.3.0",
        "--artifact",
        str(artifact),
        "--restarts-vpn-service",
        "--keys",
        str(keys_dir),
    )
    assert (code, err) == (ExitCode.OK, "")
    ok(
        addr,
        "releases",
        "publish",
        "--version",
        "1.3.1",
        "--artifact",
        str(artifact),
        "--keys",
        str(keys_dir),
    )
    assert [meta.restarts_vpn_service for meta, _, _ in fake.published] == [True, False]


def test_releases_sync_reports_what_it_imported(addr: str, fake: FakeController) -> None:
    fake.feed = [_release("1.3.0", notes="From the feed.", vpn=True), _release("1.2.0")]
    code, out, err = cli(addr, "releases", "sync")
    assert (code, err) == (ExitCode.OK, "")
    lines = out.splitlines()
    assert lines[0] == "imported 1 release(s) from the feed:"
    assert lines[2].split()[0] == "1.3.0" and lines[2].endswith("restarts  any   From the feed.")
    code, out, _ = cli(addr, "releases", "sync")
    assert (code, out) == (ExitCode.OK, "no new releases in the feed\n")
    assert json.loads(ok(addr, "releases", "sync", "--json")) == []


def test_releases_sync_without_a_feed_is_rejected(addr: str) -> None:
    code, out, err = cli(addr, "releases", "sync")
    assert (code, out) == (ExitCode.REJECTED, "")
    assert err == "upgradectl: error: this controller has no release feed to check\n"


def test_admins_add_list_remove(addr: str, fake: FakeController) -> None:
    assert cli(addr, "admins", "list") == (
        ExitCode.OK,
        "no admins yet (upgradectl admins add EMAIL)\n",
        "",
    )
    code, out, _ = cli(addr, "admins", "add", "Ops@Example.com")
    assert (code, out) == (ExitCode.OK, "ops@example.com is an admin: the notifier emails it\n")
    ok(addr, "admins", "add", "noc@example.com")
    out = ok(addr, "admins", "list", "--json")
    assert json.loads(out) == [{"email": "noc@example.com"}, {"email": "ops@example.com"}]
    assert ok(addr, "admins", "list").splitlines() == [
        "EMAIL",
        "noc@example.com",
        "ops@example.com",
    ]
    code, out, _ = cli(addr, "admins", "remove", "noc@example.com")
    assert (code, out) == (ExitCode.OK, "noc@example.com is no longer an admin\n")
    assert fake.admins == ["ops@example.com"]


def test_admins_refusals_carry_the_controllers_words(addr: str) -> None:
    code, _, err = cli(addr, "admins", "remove", "ghost@example.com")
    assert code == ExitCode.REJECTED
    assert err == (
        "upgradectl: error: ghost@example.com is not an admin; "
        "`upgradectl admins list` shows who is\n"
    )
    code, _, err = cli(addr, "admins", "add", "not-an-address")
    assert code == ExitCode.REJECTED
    assert "invalid email address 'not-an-address'" in err


# --- Text from outside reaches the terminal escaped ------------------------------------------

# Clears the screen, hides what follows, reverses it, rings, sends CSI as one C1 byte,
# returns the cursor, and opens a bidi isolate: what a hostile release or gateway could send.
NASTY = "\x1b[2J\x1b[8m\u202eevil\x9b2J\x07\r\x7f\u2066"
SHOWN = "\\x1b[2J\\x1b[8m\\u202eevil\\x9b2J\\x07\\r\\x7f\\u2066"
_FORMAT = set("\u061c\u200b\u200c\u200d\u200e\u200f\u2028\u2029\ufeff")
_FORMAT |= {chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def _active(text: str) -> list[str]:
    """The characters in ``text`` a terminal would act on (a newline ends a line, fine)."""
    return [
        ch
        for ch in text
        if (ch != "\n" and (ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0)) or ch in _FORMAT
    ]


def _hostile(fake: FakeController) -> None:
    """Every string the controller sends, hostile (versions stay comparable for the plan)."""
    gw = NASTY + "gw"
    fake.gateways = [controller_pb2.Gateway(id=gw, version=NASTY, state=NASTY)]
    fake.releases = [
        controller_pb2.Release(
            version="1.2.0", sha256=NASTY, size=1, published_at=_ts(), notes=f"{NASTY}\n{NASTY}"
        ),
        controller_pb2.Release(version="1.1.0", sha256=NASTY, notes=NASTY, restarts_vpn_service=1),
    ]
    fake.releases[0].restarts_vpn_service = True
    fake.fleet = {gw: ("1.1.0", 2)}
    job = controller_pb2.Job(
        job_id=NASTY,
        state=JS.JOB_STATE_PENDING,
        target_version="1.2.0",
        source=NASTY,
        requested_by=NASTY,
        gateways=[
            controller_pb2.GatewayJob(
                gateway_id=gw, from_version=NASTY, to_version=NASTY, error=NASTY
            )
        ],
    )
    fake.started = job
    fake.final = controller_pb2.Job()
    fake.final.CopyFrom(job)
    fake.final.state = JS.JOB_STATE_FAILED
    fake.jobs = [job]
    fake.events = [
        _event(1, gw, GS.GATEWAY_JOB_STATE_ROLLED_BACK, error=NASTY),
        _event(2, jstate=JS.JOB_STATE_FAILED, error=NASTY),
    ]
    fake.rejected = [
        controller_pb2.RejectedJob(message_id=NASTY, reason=NASTY, body=NASTY, user_id=NASTY)
    ]
    fake.admins = [NASTY]
    fake.feed = [_release("1.3.0", notes=NASTY)]
    fake.tokens = [controller_pb2.Token(name=NASTY, role=NASTY, created_at=_ts(), created_by=NASTY)]
    fake.audit = [
        controller_pb2.AuditEvent(
            seq=1, at=_ts(), actor=NASTY, peer=NASTY, action=NASTY, detail=NASTY, outcome=NASTY
        )
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["gateways", "list"],
        ["releases", "list"],
        ["releases", "sync"],
        ["jobs", "list"],
        ["jobs", "rejected"],
        ["admins", "list"],
        ["tokens", "list"],
        ["audit"],
        ["status"],
        ["status", "--watch"],
        ["upgrade", "--latest", "--yes"],
        ["upgrade", "--latest", "--yes", "--wait"],
        ["upgrade", "--latest", "--yes", "--json"],  # the plan, for people, on stderr
    ],
)
def test_text_from_the_controller_is_shown_escaped(
    addr: str, fake: FakeController, args: list[str]
) -> None:
    _hostile(fake)
    _, out, err = cli(addr, *args)
    assert _active(out + err) == [], out + err
    # Shown, not dropped (a table's notes column shows their first line only).
    assert "\\x1b[2J\\x1b[8m\\u202eevi" in out + err


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (["gateways", "list"], lambda d: d[0]["id"][: len(NASTY)]),
        (["releases", "list"], lambda d: d[0]["notes"][: len(NASTY)]),
        (["jobs", "list"], lambda d: d[0]["gateways"][0]["error"]),
        (["jobs", "rejected"], lambda d: d[0]["body"]),
        (["admins", "list"], lambda d: d[0]["email"]),
        (["tokens", "list"], lambda d: d[0]["created_by"]),
        (["audit"], lambda d: d[0]["detail"]),
        (["status"], lambda d: d["job_id"]),
    ],
)
def test_json_keeps_the_controllers_text_as_it_is(
    addr: str, fake: FakeController, args: list[str], where: Any
) -> None:
    _hostile(fake)
    code, out, err = cli(addr, *args, "--json")
    assert (code, err) == (ExitCode.OK, "")
    assert where(json.loads(out)) == NASTY
    assert _active(out) == []  # JSON escapes controls itself


def test_release_notes_cannot_hide_the_plan_before_the_question(
    addr: str, fake: FakeController
) -> None:
    """Notes that clear the screen and turn text invisible are shown as text, and the plan
    and the VPN warning stay readable up to the question."""
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    fake.releases[0] = _release("1.2.0", notes="\x1b[2J\x1b[8mRoutine fixes.\r\nMore.", vpn=True)
    code, out, err = cli(addr, "upgrade", "--latest", stdin=_Terminal("y\n"))
    assert (code, err) == (ExitCode.OK, "")
    before, _ = out.split("Proceed? [y/N] ")
    assert before.splitlines()[:4] == [
        "plan: install release 1.2.0 (published 2025-03-01 12:00 UTC)",
        "release notes:",
        "  \\x1b[2J\\x1b[8mRoutine fixes.",
        "  More.",
    ]
    assert "!! 8 VPN user(s) connected now to gw-1, gw-2 will be disconnected." in before
    assert _active(out) == []


def test_errors_keep_their_lines_and_escape_the_rest(addr: str, fake: FakeController) -> None:
    fake.releases = [_release("1.2.0"), controller_pb2.Release(version=f"{NASTY}\nforged line")]
    code, _, err = cli(addr, "upgrade", "--version", "9.9.9")
    assert code == ExitCode.REJECTED
    assert err == (
        f"upgradectl: error: unknown version 9.9.9; available: 1.2.0, {SHOWN}\nforged line\n"
    )


# --- A StartUpgrade whose answer is lost ------------------------------------------------------


def _retry_argv(err: str) -> list[str]:
    """The command the error says retries safely (the line after 'to retry safely')."""
    lines = err.splitlines()
    index = next(i for i, line in enumerate(lines) if "to retry safely" in line)
    return shlex.split(lines[index + 1])


def test_start_upgrade_slower_than_the_deadline_says_how_to_look_and_retry(
    addr: str, fake: FakeController
) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    fake.stall = threading.Event()
    try:
        code, out, err = cli(
            addr, "upgrade", "--latest", "--gateways", "gw-1,gw-2", "--yes", call_timeout=0.5
        )
    finally:
        fake.stall.set()
    assert code == ExitCode.UNCONFIRMED
    assert "job job-1" not in out  # no job was shown: none was confirmed
    (sent,) = fake.start_requests
    rid = sent.request_id
    assert err.splitlines() == [
        f"upgradectl: error: the controller at {addr} did not answer StartUpgrade (no answer "
        f"within 0.5 s); the upgrade to 1.2.0 may have started anyway (request id {rid})",
        "  to look: 'upgradectl jobs list' (a job to 1.2.0 created just now) or "
        "'upgradectl status' (the most recent job)",
        "  to retry safely (if that request started a job, the answer is that job and no "
        "second one starts):",
        f"    upgradectl --controller {addr} upgrade --version 1.2.0 --gateways gw-1,gw-2 "
        f"--request-id {rid} --yes",
    ]
    argv = _retry_argv(err)
    assert argv[:3] == ["upgradectl", "--controller", addr]
    code, out, err = cli(addr, *argv[3:])
    assert (code, err) == (ExitCode.OK, "")
    assert [r.request_id for r in fake.start_requests] == [rid, rid]
    assert fake.start_requests[1].version == "1.2.0"  # what the plan showed, not "latest"
    assert "job job-1  target 1.2.0" in out


@pytest.mark.parametrize("failure", ["unavailable", "crash"])
def test_start_upgrade_failing_without_a_refusal_is_unconfirmed(
    addr: str, fake: FakeController, failure: str
) -> None:
    if failure == "unavailable":
        fake.unavailable["StartUpgrade"] = 1000
    else:
        fake.crash = True
    code, out, err = cli(addr, "upgrade", "--version", "1.2.0", "--json", "--allow-downgrade")
    assert (code, out) == (ExitCode.UNCONFIRMED, "")
    rid = fake.start_requests[0].request_id
    assert {r.request_id for r in fake.start_requests} == {rid}
    assert f"may have started anyway (request id {rid})" in err
    assert _retry_argv(err)[3:] == [
        "upgrade", "--version", "1.2.0", "--allow-downgrade", "--request-id", rid, "--json",
    ]  # fmt: skip


def test_request_id_is_sent_as_given(addr: str, fake: FakeController) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    code, out, err = cli(addr, "upgrade", "--latest", "--request-id", "op-7.retry_1", "--json")
    assert code == ExitCode.OK, err
    assert json.loads(out)["job_id"] == "job-1"
    assert fake.start_requests[0].request_id == "op-7.retry_1"


@pytest.mark.parametrize("bad", ["", "has space", "management:m-1", "x" * 129, "-flag", "é"])
def test_a_malformed_request_id_is_a_usage_error(addr: str, fake: FakeController, bad: str) -> None:
    code, _, err = cli(addr, "upgrade", "--latest", f"--request-id={bad}")
    assert code == ExitCode.USAGE
    assert "argument --request-id: expected 1 to 128 letters, digits" in err
    assert fake.plan_requests == []


def test_a_request_id_used_for_another_version_is_refused(addr: str, fake: FakeController) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)  # a job to 1.2.0
    fake.fleet = {"gw-1": ("1.0.0", 0)}
    code, out, err = cli(addr, "upgrade", "--version", "1.1.0", "--request-id", "r-1")
    assert code == ExitCode.REJECTED
    assert "job job-1" not in out
    assert err == (
        "upgradectl: error: request id r-1 belongs to job job-1, an upgrade to 1.2.0, not "
        "1.1.0: nothing was started; see 'upgradectl status job-1', or leave out "
        "--request-id to start a new upgrade\n"
    )


def test_nothing_to_do_with_a_request_id_points_at_the_jobs(
    addr: str, fake: FakeController
) -> None:
    fake.fleet = {"gw-1": ("1.2.0", 0)}
    code, out, err = cli(addr, "upgrade", "--latest", "--request-id", "r-1")
    assert (code, err) == (ExitCode.OK, "")
    assert out.splitlines()[-2:] == [
        "nothing to do: every chosen gateway already runs 1.2.0",
        "(a job started earlier with request id r-1, if any, is in 'upgradectl jobs list')",
    ]
    assert fake.start_requests == []


def test_a_watch_that_fails_after_the_start_names_the_job(addr: str, fake: FakeController) -> None:
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    fake.unavailable["WatchJob"] = 1000
    code, _, err = cli(addr, "upgrade", "--latest", "--wait")
    assert code == ExitCode.UNREACHABLE
    lines = err.splitlines()
    assert lines[0].startswith(
        "upgradectl: error: job job-1 was started and goes on in the controller, but "
        f"following it failed: cannot reach the controller at {addr}: controller is restarting"
    )
    assert lines[1] == "follow it again with: upgradectl status job-1 --watch"
    assert len(fake.start_requests) == 1


# --- Signed releases: the key directory, publishing, yanking, rotating keys --------------


def _artifact(tmp_path: Path, version: str) -> Path:
    path = tmp_path / f"release-{version}.pyz"
    path.write_bytes(f"the artifact of {version}\n".encode() * 50)
    return path


def _publish(addr: str, tmp_path: Path, keys_dir: Path, version: str) -> Path:
    artifact = _artifact(tmp_path, version)
    ok(addr, "releases", "publish", "--version", version, "--artifact", str(artifact),
       "--keys", str(keys_dir))  # fmt: skip
    return artifact


def _targets(data: bytes, root: Any) -> Any:
    """The Targets in ``data``, once they verify against ``root`` (hitless.trust)."""
    md = read_metadata(data, Targets)
    verify_role(root, md, "targets")
    return md.signed


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_keys_init_says_what_it_made_and_where_each_part_goes(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    code, out, err = cli("127.0.0.1:1", "keys", "init", "--dir", str(directory))
    assert (code, err) == (ExitCode.OK, "")
    paths = trust_keys.KeyPaths(directory)
    root = paths.root()
    assert root.version == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"made the key directory {directory}: root version 1, expires ")
    assert lines[2].split() == ["ROLE", "KEY", "ID", "FILE"]
    rows = [line.split() for line in lines[3:8]]
    assert [row[0] for row in rows] == list(trust_roles.ROLES)
    for role, keyid, path in rows:
        assert path == str(paths.key(role))
        assert keyid == trust_keys.load_signer(paths.key(role)).public_key.keyid
    text = "\n".join(lines[8:])
    assert f"  {directory}/root.json\n      the trust anchor: give it to the controller" in text
    assert (
        "--trust-root FILE" in text
        and "gateways get it from the controller when they enroll" in text
    )
    assert f"  {directory}/offline/  (root and targets keys)\n      stay with the release " in text
    assert f"  {directory}/online/  (snapshot, timestamp and command keys)\n      go to " in text
    assert "controller-svc serve --online-keys DIR" in text


def test_keys_init_never_overwrites_keys(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    trust_keys.init(directory)
    before = _tree(directory)
    code, out, err = cli("127.0.0.1:1", "keys", "init", "--dir", str(directory))
    assert (code, out) == (ExitCode.USAGE, "")
    assert err.startswith(f"upgradectl: error: {directory}/root.json, ")
    assert err.endswith("already exist: keys are never overwritten; choose an empty directory, "
                        "or rotate keys with a root rotation\n")  # fmt: skip
    assert _tree(directory) == before


def test_keys_init_where_nothing_can_be_written_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    code, out, err = cli("127.0.0.1:1", "keys", "init", "--dir", str(tmp_path / "file" / "k"))
    assert (code, out) == (ExitCode.USAGE, "")
    assert err.startswith(f"upgradectl: error: cannot write the private key {tmp_path}/file/k/")


def test_publish_signs_the_artifact_into_the_next_targets_version(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    first = _publish(addr, tmp_path, keys_dir, "1.3.0")
    second = _publish(addr, tmp_path, keys_dir, "1.4.0")

    root = trust_keys.KeyPaths(keys_dir).root()
    one, two = (_targets(meta.targets_metadata, root) for meta, _, _ in fake.published)
    assert (one.version, sorted(one.targets)) == (1, ["hitless-1.3.0.pyz"])
    assert (two.version, sorted(two.targets)) == (2, ["hitless-1.3.0.pyz", "hitless-1.4.0.pyz"])
    for name, path in (("hitless-1.3.0.pyz", first), ("hitless-1.4.0.pyz", second)):
        data = path.read_bytes()
        assert two.targets[name].length == len(data)
        assert two.targets[name].hashes == {"sha256": hashlib.sha256(data).hexdigest()}
    # A gateway's own check, from the trust anchor through the repository the controller
    # published: the artifact verifies.
    anchor = (keys_dir / "root.json").read_bytes()
    client = TrustClient(anchor, tmp_path / "gw-cache", DirectorySource(tmp_path / "repo"))
    verify_artifact(second, client.target("hitless-1.4.0.pyz"))


def test_publish_without_keys_is_refused_by_the_controller(
    addr: str, fake: FakeController, tmp_path: Path
) -> None:
    artifact = _artifact(tmp_path, "1.3.0")
    code, out, err = cli(
        addr, "releases", "publish", "--version", "1.3.0", "--artifact", str(artifact)
    )
    assert (code, out) == (ExitCode.REJECTED, "")
    assert err.startswith(
        "upgradectl: error: release 1.3.0 comes without signed targets metadata: sign it where "
        "it is built (upgradectl releases publish --keys DIR"
    )
    ((meta, _, _),) = fake.published
    assert meta.targets_metadata == b""


def test_publish_with_keys_the_controller_does_not_trust_uploads_nothing(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    _publish(addr, tmp_path, keys_dir, "1.3.0")
    other = trust_keys.init(tmp_path / "other").dir
    artifact = _artifact(tmp_path, "1.4.0")
    code, out, err = cli(addr, "releases", "publish", "--version", "1.4.0", "--artifact",
                         str(artifact), "--keys", str(other))  # fmt: skip
    assert (code, out) == (ExitCode.REJECTED, "")
    assert err.startswith(
        "upgradectl: error: the controller's signed targets (version 1) do not verify against "
        f"root version 1 in {other}: "
    )
    assert "Give the key directory whose root.json the controller trusts" in err
    assert len(fake.published) == 1


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing", "upgradectl: error: cannot read {dir}/root.json: "),
        ("no targets key", "upgradectl: error: cannot load the private key {dir}/offline/"),
        ("wrong targets key", "upgradectl: error: {dir}/offline/targets.pem is key "),
    ],
)
def test_key_errors_are_usage_errors_with_the_librarys_message(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path, damage: str, expected: str
) -> None:
    paths = trust_keys.KeyPaths(keys_dir)
    if damage == "missing":
        keys_dir = tmp_path / "nowhere"
    elif damage == "no targets key":
        paths.key("targets").unlink()
    else:
        paths.key("targets").unlink()
        paths.key("targets").write_bytes(paths.key("snapshot").read_bytes())
    artifact = _artifact(tmp_path, "1.3.0")
    for args in (
        ["releases", "publish", "--version", "1.3.0", "--artifact", str(artifact)],
        ["releases", "yank", "1.3.0", "--yes"],
    ):
        code, out, err = cli(addr, *args, "--keys", str(keys_dir))
        assert (code, out) == (ExitCode.USAGE, ""), err
        assert err.startswith(expected.format(dir=keys_dir)), err
    assert fake.published == [] and fake.yank_requests == []


def test_publish_with_a_malformed_version_signs_nothing(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    artifact = _artifact(tmp_path, "1.3.0")
    code, _, err = cli(addr, "releases", "publish", "--version", "1.3", "--artifact",
                       str(artifact), "--keys", str(keys_dir))  # fmt: skip
    assert code == ExitCode.USAGE
    assert "invalid version '1.3': expected MAJOR.MINOR.PATCH" in err
    assert fake.published == []


def test_yank_signs_the_targets_without_the_release(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    artifact = _publish(addr, tmp_path, keys_dir, "1.3.0")
    _publish(addr, tmp_path, keys_dir, "1.4.0")
    code, out, err = cli(addr, "releases", "yank", "1.3.0", "--keys", str(keys_dir), "--yes")
    assert (code, err) == (ExitCode.OK, "")
    (request,) = fake.yank_requests
    assert request.version == "1.3.0"
    three = _targets(request.targets_metadata, trust_keys.KeyPaths(keys_dir).root())
    assert (three.version, sorted(three.targets)) == (3, ["hitless-1.4.0.pyz"])
    sha256 = hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert out.splitlines() == [
        "release 1.3.0: targets version 2 lists hitless-1.3.0.pyz "
        f"({render.human_size(artifact.stat().st_size)}, sha256 {sha256})",
        "yanking publishes targets version 3 without it: from then on the controller and every "
        "gateway refuse to install it",
        "yanked 1.3.0: targets version 3 no longer lists hitless-1.3.0.pyz (signing: YANKED)",
    ]


def test_yank_without_a_terminal_or_yes_does_nothing(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    _publish(addr, tmp_path, keys_dir, "1.3.0")
    code, out, err = cli(addr, "releases", "yank", "1.3.0", "--keys", str(keys_dir))
    assert code == ExitCode.NEEDS_CONFIRMATION
    assert out.startswith("release 1.3.0: targets version 1 lists hitless-1.3.0.pyz")
    assert err == (
        "upgradectl: error: yanking release 1.3.0 needs confirmation, and standard input is not "
        "a terminal to ask on, so nothing was done: add --yes to confirm\n"
    )
    assert fake.yank_requests == []


@pytest.mark.parametrize(("answer", "code"), [("y\n", ExitCode.OK), ("n\n", ExitCode.DECLINED),
                                              ("", ExitCode.DECLINED)])  # fmt: skip
def test_yank_asks_on_a_terminal(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path, answer: str, code: int
) -> None:
    _publish(addr, tmp_path, keys_dir, "1.3.0")
    got, out, err = cli(addr, "releases", "yank", "1.3.0", "--keys", str(keys_dir),
                        stdin=_Terminal(answer))  # fmt: skip
    assert got == code, err
    assert "refuse to install it\nProceed? [y/N] " in out
    assert len(fake.yank_requests) == (1 if code == ExitCode.OK else 0)
    if code == ExitCode.DECLINED:
        assert err == (
            "upgradectl: error: yanking release 1.3.0 was not confirmed: nothing was done\n"
        )


def test_yank_of_a_release_the_targets_do_not_list_is_rejected_without_asking(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    args = ("releases", "yank", "1.9.0", "--keys", str(keys_dir))
    code, out, err = cli(addr, *args, stdin=_NoAnswer())
    assert (code, out) == (ExitCode.REJECTED, "")
    assert err == (
        "upgradectl: error: the controller publishes no signed targets yet: release 1.9.0 is "
        "not listed, there is nothing to yank\n"
    )
    _publish(addr, tmp_path, keys_dir, "1.3.0")
    code, out, err = cli(addr, *args, stdin=_NoAnswer())
    assert (code, out) == (ExitCode.REJECTED, "")
    assert err.startswith(
        "upgradectl: error: release 1.9.0 is not in the signed targets (version 1 lists "
        "hitless-1.3.0.pyz): nothing to yank"
    )
    assert fake.yank_requests == []


def test_rotating_the_targets_key_re_signs_the_controllers_targets(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    _publish(addr, tmp_path, keys_dir, "1.3.0")
    paths = trust_keys.KeyPaths(keys_dir)
    old_targets_key = trust_keys.load_signer(paths.key("targets")).public_key.keyid

    code, out, err = cli(addr, "keys", "rotate", "--dir", str(keys_dir), "--roles", "targets")
    assert (code, err) == (ExitCode.OK, "")
    (request,) = fake.rotate_requests
    assert request.root == paths.root_json.read_bytes()
    new_root = paths.root()
    assert new_root.version == 2
    assert new_root.roles["targets"].keyids != [old_targets_key]
    two = _targets(request.targets_metadata, new_root)  # verifies under the new root
    assert (two.version, sorted(two.targets)) == (2, ["hitless-1.3.0.pyz"])
    assert out.splitlines() == [
        f"the controller trusts root version 2: new targets key(s) (the replaced ones are in "
        f"{keys_dir}/retired/)",
        "it took targets version 2 with it, re-signed with the new targets key",
        "gateways follow the rotation the next time they verify a command or a release; a new "
        f"gateway may be given {keys_dir}/root.json or any older root.json",
    ]
    # Releases go on being signed with the new key.
    _publish(addr, tmp_path, keys_dir, "1.4.0")
    assert fake.repo is not None
    published = fake.repo.targets()
    assert published is not None
    assert sorted(published.targets) == ["hitless-1.3.0.pyz", "hitless-1.4.0.pyz"]


def test_rotating_the_command_key_sends_the_root_alone(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    _publish(addr, tmp_path, keys_dir, "1.3.0")
    code, out, err = cli(addr, "keys", "rotate", "--dir", str(keys_dir), "--roles",
                         "command,command")  # fmt: skip
    assert (code, err) == (ExitCode.OK, "")
    (request,) = fake.rotate_requests
    assert request.targets_metadata == b""
    assert out.splitlines()[0].startswith("the controller trusts root version 2: new command key")
    assert len(out.splitlines()) == 2


def test_a_rotation_the_controller_refuses_is_kept_and_sent_again_with_resend(
    addr: str, fake: FakeController, tmp_path: Path
) -> None:
    """The controller reads its online keys from a directory of its own: it takes a root
    that rotates them only once the new keys are there."""
    paths = trust_keys.init(tmp_path / "keys")
    online = tmp_path / "controller-online"
    shutil.copytree(paths.online, online)
    fake.repo = Repository(tmp_path / "repo", paths.root_json.read_bytes(), online)
    controller = ["--controller", addr]

    code, out, err = cli(addr, "keys", "rotate", "--dir", str(paths.dir), "--roles",
                         "timestamp,targets")  # fmt: skip
    assert (code, out) == (ExitCode.REJECTED, "")
    lines = err.splitlines()
    assert lines[0].startswith("upgradectl: error: root metadata refused: ")
    assert "timestamp" in lines[0]
    assert lines[1:] == [
        f"root version 2 is made and saved in {paths.dir} (replaced keys in {paths.dir}/retired/),"
        " but the controller has not taken it:",
        "  the controller needs the new timestamp key(s) before it takes this root: copy "
        f"{paths.online}/ to its --online-keys directory (unless it reads them there)",
        f"  send it again with: {shlex.join(['upgradectl', *controller, 'keys', 'rotate', '--dir', str(paths.dir), '--resend'])}",  # noqa: E501
    ]
    assert paths.root().version == 2

    shutil.rmtree(online)
    shutil.copytree(paths.online, online)
    resend = shlex.split(lines[-1].split("send it again with: ")[1])
    code, out, err = cli(addr, *resend[3:])
    assert (code, err) == (ExitCode.OK, "")
    assert out.splitlines()[0].startswith(
        "the controller trusts root version 2: new targets, timestamp key(s)"
    )
    assert paths.root().version == 2  # nothing rotated a second time
    assert fake.repo.root.version == 2
    assert fake.repo.targets() is None  # nothing published, nothing to re-sign


def test_nothing_is_rotated_when_the_controller_cannot_be_reached(
    tmp_path: Path, keys_dir: Path, ca_cert: Path
) -> None:
    before = _tree(keys_dir)
    nobody = Address(f"127.0.0.1:{free_port()}", ca_cert)
    code, _, err = cli(nobody, "keys", "rotate", "--dir", str(keys_dir), "--roles", "targets")
    assert code == ExitCode.UNREACHABLE
    assert "cannot reach the controller" in err
    assert _tree(keys_dir) == before


def test_nothing_is_rotated_for_a_controller_trusting_another_root(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    _publish(addr, tmp_path, keys_dir, "1.3.0")
    other = trust_keys.init(tmp_path / "other").dir
    before = _tree(other)
    code, _, err = cli(addr, "keys", "rotate", "--dir", str(other), "--roles", "targets")
    assert code == ExitCode.REJECTED
    assert "do not verify against root version 1 in" in err
    assert _tree(other) == before
    assert fake.rotate_requests == []


def test_rotate_root_is_sent_once_and_a_lost_answer_says_how_to_finish(
    addr: str, fake: FakeController, keys_dir: Path
) -> None:
    fake.unavailable["RotateRoot"] = 1
    code, _, err = cli(addr, "keys", "rotate", "--dir", str(keys_dir), "--roles", "snapshot")
    assert code == ExitCode.UNCONFIRMED
    assert len(fake.rotate_requests) == 1
    assert "did not answer RotateRoot" in err
    assert "but the controller may have taken it (no answer came; if it did, sending it " in err
    code, _, err = cli(addr, "keys", "rotate", "--dir", str(keys_dir), "--resend")
    assert code == ExitCode.OK, err


def test_resend_without_a_rotation_is_a_usage_error(addr: str, keys_dir: Path) -> None:
    code, _, err = cli(addr, "keys", "rotate", "--dir", str(keys_dir), "--resend")
    assert code == ExitCode.USAGE
    assert err == (
        f"upgradectl: error: {keys_dir}/root.json is root version 1: no rotation to send; "
        f"rotate keys with 'upgradectl keys rotate --dir {keys_dir} --roles ROLE,...'\n"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["keys", "rotate", "--dir", "d"], "one of the arguments --roles --resend is required"),
        (["keys", "rotate", "--dir", "d", "--roles", "targets", "--resend"], "not allowed with"),
        (["keys", "rotate", "--dir", "d", "--roles", "admin"], "expected some of root,targets,"),
        (["keys", "rotate", "--dir", "d", "--roles", ","], "expected some of root,targets,"),
        (["keys", "init"], "the following arguments are required: --dir"),
        (["releases", "yank", "1.2.0"], "the following arguments are required: --keys"),
    ],
)
def test_keys_usage_errors(args: list[str], expected: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = run(args, env={}, out=out, err=err, retry=FAST_RETRY)
    assert code == ExitCode.USAGE
    assert expected in err.getvalue()


def test_releases_list_shows_signing(addr: str, fake: FakeController) -> None:
    assert [r["signing"] for r in json.loads(ok(addr, "releases", "list", "--json"))] == [
        "SIGNED",
        "YANKED",
    ]
    lines = ok(addr, "releases", "list").splitlines()
    header, signed, yanked = (re.split(" {2,}", line) for line in lines)
    column = header.index("SIGNING")
    assert (signed[column], yanked[column]) == ("SIGNED", "YANKED")


def test_signed_releases_end_to_end_with_the_real_controller(fleet: Fleet) -> None:
    """Publish, yank and a targets key rotation through the real executable against a real
    controller trusting the fleet's key directory."""
    keys_dir = str(fleet.keys.dir)
    artifact = str(fleet.root / "release-1.3.0.pyz")
    fleet.cli("releases", "build", "--version", "1.3.0", "-o", artifact)

    unsigned = fleet.cli("releases", "publish", "--version", "1.3.0", "--artifact", artifact,
                         check=False)  # fmt: skip
    assert unsigned.returncode == ExitCode.REJECTED, unsigned.stderr
    assert "without signed targets metadata" in unsigned.stderr
    assert fleet.cli_json("releases", "list") == []

    published = fleet.cli("releases", "publish", "--version", "1.3.0", "--artifact", artifact,
                          "--keys", keys_dir)  # fmt: skip
    assert published.stdout.splitlines()[1] == (
        "signing: SIGNED (targets version 1 lists hitless-1.3.0.pyz)"
    )
    fleet.release("1.4.0")
    assert {r["version"]: r["signing"] for r in fleet.cli_json("releases", "list")} == {
        "1.4.0": "SIGNED",
        "1.3.0": "SIGNED",
    }

    fleet.cli("releases", "yank", "1.3.0", "--keys", keys_dir, "--yes")
    assert {r["version"]: r["signing"] for r in fleet.cli_json("releases", "list")} == {
        "1.4.0": "SIGNED",
        "1.3.0": "YANKED",
    }
    refused = fleet.cli("upgrade", "--version", "1.3.0", "--yes", check=False)
    assert refused.returncode == ExitCode.REJECTED, refused.stderr
    assert "release 1.3.0 was yanked" in refused.stderr

    rotated = fleet.cli("keys", "rotate", "--dir", keys_dir, "--roles", "targets,command")
    assert rotated.stdout.splitlines()[1] == (
        "it took targets version 4 with it, re-signed with the new targets key"
    )
    fleet.release("1.5.0")
    assert {r["version"]: r["signing"] for r in fleet.cli_json("releases", "list")} == {
        "1.5.0": "SIGNED",
        "1.4.0": "SIGNED",
        "1.3.0": "YANKED",
    }


# --- Operator authentication: the token sent, refusals, tokens and the audit log ----------


def _auth(fake: FakeController) -> list[list[str]]:
    """The authorization values each call to the fake carried, in order."""
    return [sent for _, sent in fake.calls]


def _token_file(tmp_path: Path, text: str, name: str = "token") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="ascii")
    path.chmod(0o600)
    return str(path)


def test_the_token_comes_from_hitless_token(addr: str, fake: FakeController) -> None:
    code, _, err = cli(addr, "gateways", "list", env={"HITLESS_TOKEN": "s3cret"})
    assert (code, err) == (ExitCode.OK, "")
    assert fake.calls == [("ListGateways", ["Bearer s3cret"])]


def test_the_token_comes_from_token_file_with_whitespace_ignored(
    addr: str, fake: FakeController, tmp_path: Path
) -> None:
    path = _token_file(tmp_path, "  \n s3cret\t\r\n\n")
    code, _, err = cli(addr, "--token-file", path, "gateways", "list")
    assert (code, err) == (ExitCode.OK, "")
    assert _auth(fake) == [["Bearer s3cret"]]


def test_the_token_comes_from_hitless_token_file(
    addr: str, fake: FakeController, tmp_path: Path
) -> None:
    path = _token_file(tmp_path, "s3cret\n")
    code, _, err = cli(addr, "gateways", "list", env={"HITLESS_TOKEN_FILE": path})
    assert (code, err) == (ExitCode.OK, "")
    assert _auth(fake) == [["Bearer s3cret"]]


@pytest.mark.parametrize(
    ("env_token", "flag_file", "env_file", "sent"),
    [
        ("from-env", "flag", "envfile", "from-env"),
        ("from-env", "missing", "missing", "from-env"),  # a file not needed is not read
        ("", "flag", "envfile", "from-flag"),  # empty counts as not set
        (None, "flag", "envfile", "from-flag"),
        (None, None, "envfile", "from-env-file"),
    ],
)
def test_token_precedence(
    addr: str,
    fake: FakeController,
    tmp_path: Path,
    env_token: str | None,
    flag_file: str | None,
    env_file: str | None,
    sent: str,
) -> None:
    files = {
        "flag": _token_file(tmp_path, "from-flag", "flag"),
        "envfile": _token_file(tmp_path, "from-env-file", "envfile"),
        "missing": str(tmp_path / "missing"),
    }
    env = {} if env_token is None else {"HITLESS_TOKEN": env_token}
    if env_file:
        env["HITLESS_TOKEN_FILE"] = files[env_file]
    flags = ["--token-file", files[flag_file]] if flag_file else []
    code, _, err = cli(addr, *flags, "gateways", "list", env=env)
    assert (code, err) == (ExitCode.OK, "")
    assert _auth(fake) == [[f"Bearer {sent}"]]


def test_no_token_sends_none(addr: str, fake: FakeController) -> None:
    assert ok(addr, "gateways", "list")
    assert fake.calls == [("ListGateways", [])]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read the token file {path} (--token-file): No such file or directory"),
        ("dir", "cannot read the token file {path} (--token-file): Is a directory"),
        (" \n", "the file {path} (--token-file) is empty: it should hold the secret"),
        ("two words", "the file {path} (--token-file) does not hold a token: a token is one"),
        ("x" * 5000, "the token file {path} (--token-file) is larger than 4096 bytes"),
        ("caf\u00e9", "the file {path} (--token-file) does not hold a token"),
    ],
)
def test_a_token_file_that_cannot_be_used_is_a_usage_error_naming_it(
    addr: str, fake: FakeController, tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "token"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    code, out, err = cli(addr, "--token-file", str(path), "gateways", "list")
    assert (code, out) == (ExitCode.USAGE, "")
    assert err.startswith("upgradectl: error: " + expected.format(path=path)), err
    assert "two words" not in err and "café" not in err  # a secret is never shown
    assert fake.calls == []  # nothing was sent without the token asked for


def test_an_unreadable_token_file_named_by_the_environment_says_so(
    addr: str, fake: FakeController, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    code, _, err = cli(addr, "gateways", "list", env={"HITLESS_TOKEN_FILE": str(path)})
    assert code == ExitCode.USAGE
    assert err == (
        f"upgradectl: error: cannot read the token file {path} (HITLESS_TOKEN_FILE): "
        "No such file or directory\n"
    )
    code, _, err = cli(addr, "gateways", "list", env={"HITLESS_TOKEN": "has space"})
    assert code == ExitCode.USAGE
    assert err.startswith("upgradectl: error: HITLESS_TOKEN does not hold a token")
    assert "has space" not in err
    assert fake.calls == []


def test_commands_that_need_no_controller_never_read_the_token_file(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    missing = str(tmp_path / "missing")
    argv = ["--token-file", missing, "releases", "build", "--version", "1.3.0", "-o",
            str(tmp_path / "a.pyz")]  # fmt: skip
    assert run(argv, env={}, out=out, err=err) == ExitCode.OK, err.getvalue()


def test_the_token_is_sent_on_unary_and_streaming_calls(
    addr: str, fake: FakeController, tmp_path: Path, keys_dir: Path
) -> None:
    fake.secrets = {"s3cret": "admin"}
    env = {"HITLESS_TOKEN": "s3cret"}
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    fake.cut_watch_after = 2  # the reopened watch stream carries it too
    code, _, err = cli(addr, "upgrade", "--latest", "--wait", env=env)
    assert (code, err) == (ExitCode.OK, "")
    artifact = _artifact(tmp_path, "1.3.0")
    code, _, err = cli(addr, "releases", "publish", "--version", "1.3.0", "--artifact",
                       str(artifact), "--keys", str(keys_dir), env=env)  # fmt: skip
    assert (code, err) == (ExitCode.OK, "")
    methods = [method for method, _ in fake.calls]
    assert methods == ["PlanUpgrade", "StartUpgrade", "WatchJob", "WatchJob", "GetJob",
                       "GetTargetsMetadata", "PublishRelease"]  # fmt: skip
    assert all(sent == ["Bearer s3cret"] for sent in _auth(fake)), fake.calls


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        (
            {},
            ["gateways", "list"],
            [
                "upgradectl: error: the controller refused the credentials: this call needs an "
                "API token: give it in HITLESS_TOKEN or a --token-file"
            ],
        ),
        (
            {"HITLESS_TOKEN": "stale"},
            ["gateways", "list"],
            [
                "upgradectl: error: the controller refused the credentials: unknown API token",
                "the token sent came from HITLESS_TOKEN",
            ],
        ),
        (
            {"HITLESS_TOKEN": "viewer-secret"},
            ["audit"],
            [
                "upgradectl: error: the controller refused the credentials: ListAudit needs the "
                "admin role; this token has the viewer role",
                "the token sent came from HITLESS_TOKEN",
            ],
        ),
        (
            # CreateToken, once sent, is Unconfirmed on failures; a refusal is not one.
            {"HITLESS_TOKEN": "viewer-secret"},
            ["tokens", "create", "--role", "admin", "--name", "ci"],
            [
                "upgradectl: error: the controller refused the credentials: CreateToken needs "
                "the admin role; this token has the viewer role",
                "the token sent came from HITLESS_TOKEN",
            ],
        ),
    ],
)
def test_refused_credentials_exit_4_with_the_controllers_words(
    addr: str, fake: FakeController, env: dict[str, str], args: list[str], expected: list[str]
) -> None:
    fake.secrets = {"viewer-secret": "viewer"}
    code, out, err = cli(addr, *args, env=env)
    assert (code, out) == (ExitCode.REJECTED, "")
    assert err.splitlines() == expected
    assert len(fake.calls) == 1  # refused credentials are not retried


def test_refused_credentials_name_the_token_file(
    addr: str, fake: FakeController, tmp_path: Path
) -> None:
    fake.secrets = {"good": "admin"}
    path = _token_file(tmp_path, "revoked\n")
    code, _, err = cli(addr, "--token-file", path, "tokens", "list")
    assert code == ExitCode.REJECTED
    assert err.splitlines()[1] == f"the token sent came from the file {path} (--token-file)"


def test_refused_credentials_mid_watch_say_the_job_goes_on(addr: str, fake: FakeController) -> None:
    """An operator token may start a job and then, expired or revoked, lose the watch."""
    fake.secrets = {"s3cret": "operator"}
    _running_job(fake, gw2_final=GS.GATEWAY_JOB_STATE_SUCCEEDED)
    fake.cut_watch_after = 1  # the watch is reopened, by then without a valid token
    fake.revoke_after = "WatchJob"
    code, out, err = cli(addr, "upgrade", "--latest", "--wait", env={"HITLESS_TOKEN": "s3cret"})
    assert code == ExitCode.REJECTED
    assert "watching job job-1" in out
    assert err.splitlines() == [
        "upgradectl: error: job job-1 was started and goes on in the controller, but following "
        "it failed: the controller refused the credentials: unknown API token",
        "the token sent came from HITLESS_TOKEN",
        "follow it again with: upgradectl status job-1 --watch",
    ]
    assert [method for method, _ in fake.calls][-2:] == ["WatchJob", "WatchJob"]


def test_tokens_create_prints_the_secret_once_with_a_warning(
    addr: str, fake: FakeController
) -> None:
    out = ok(addr, "tokens", "create", "--role", "operator", "--name", "ci-deploy",
             "--expires", "90d")  # fmt: skip
    (request,) = fake.token_requests
    assert (request.name, request.role, request.expires_seconds) == (
        "ci-deploy",
        "operator",
        90 * 86400,
    )
    lines = out.splitlines()
    assert lines[:4] == [
        "created token ci-deploy: role operator, expires 2025-05-30 12:00 UTC",
        "",
        f"    {SECRET}",
        "",
    ]
    assert out.count(SECRET) == 1
    assert "not shown again" in lines[4]
    assert "--token-file FILE" in out and "HITLESS_TOKEN_FILE=FILE" in out
    assert "HITLESS_TOKEN." in out


def test_tokens_create_json_keeps_the_warning_on_stderr(addr: str, fake: FakeController) -> None:
    code, out, err = cli(addr, "tokens", "create", "--role", "viewer", "--name", "dash", "--json")
    assert code == ExitCode.OK
    assert json.loads(out) == {
        "name": "dash",
        "role": "viewer",
        "token": SECRET,
        "expires_at": None,
    }
    assert fake.token_requests[0].expires_seconds == 0  # never expires
    assert "not shown again" in err and SECRET not in err


@pytest.mark.parametrize(
    ("expires", "seconds"), [("12h", 43200), ("30m", 1800), ("3600s", 3600), ("3650d", 315360000)]
)
def test_tokens_create_expiry_units(
    addr: str, fake: FakeController, expires: str, seconds: int
) -> None:
    ok(addr, "tokens", "create", "--role", "admin", "--name", "t", "--expires", expires)
    assert fake.token_requests[0].expires_seconds == seconds


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--expires", "90"],
            "argument --expires: expected a duration: a whole number and a "
            "unit, s, m, h or d (e.g. 90d, 12h, 30m, 3600s), not '90'",
        ),
        (["--expires", "1w"], "argument --expires: expected a duration: "),
        (["--expires=-5m"], "argument --expires: expected a duration: "),
        (["--expires", "1.5h"], "argument --expires: expected a duration: "),
        (["--expires", "0s"], "argument --expires: expected a duration of at least 1s, not '0s'"),
        (["--expires", "3651d"], "expected a duration of at most 3650d, not '3651d'"),
        (["--expires", "9" * 40 + "d"], "not '" + "9" * 40 + "'... (41 characters)"),
        (["--name", "has space"], "argument --name: expected a token name of 1 to 64 letters"),
        (["--name", "x" * 65], "argument --name: expected a token name"),
        (["--role", "root"], "argument --role: invalid choice: 'root'"),
    ],
)
def test_tokens_create_usage_errors(
    addr: str, fake: FakeController, args: list[str], expected: str
) -> None:
    defaults = {"--role": "viewer", "--name": "ci"}
    for flag, value in defaults.items():
        if flag not in args:
            args = [*args, flag, value]
    code, out, err = cli(addr, "tokens", "create", *args)
    assert (code, out) == (ExitCode.USAGE, "")
    assert expected in err, err
    assert fake.calls == []


def test_tokens_create_unanswered_is_unconfirmed_and_not_retried(
    addr: str, fake: FakeController
) -> None:
    fake.unavailable["CreateToken"] = 1
    code, out, err = cli(addr, "tokens", "create", "--role", "viewer", "--name", "ci")
    assert (code, out) == (ExitCode.UNCONFIRMED, "")
    assert len(fake.token_requests) == 1
    assert err.splitlines() == [
        f"upgradectl: error: the controller at {addr} did not answer CreateToken (UNAVAILABLE: "
        "controller is restarting); the token ci may have been created, its secret lost with "
        "the answer",
        "  to look: 'upgradectl tokens list'",
        "  if it is listed: 'upgradectl tokens revoke ci', then create a token under another name",
    ]


def test_tokens_list_table_and_json(addr: str, fake: FakeController) -> None:
    ok(addr, "tokens", "create", "--role", "admin", "--name", "root-2")
    ok(addr, "tokens", "create", "--role", "viewer", "--name", "old", "--expires", "1d")
    ok(addr, "tokens", "revoke", "old")
    fake.tokens.append(controller_pb2.Token(name="bootstrap", role="admin", created_at=_ts()))
    assert json.loads(ok(addr, "tokens", "list", "--json")) == [
        {
            "name": "root-2",
            "role": "admin",
            "created_at": "2025-03-01T12:00:00Z",
            "expires_at": None,
            "revoked_at": None,
            "created_by": "token:root",
        },
        {
            "name": "old",
            "role": "viewer",
            "created_at": "2025-03-01T12:00:00Z",
            "expires_at": "2025-03-02T12:00:00Z",
            "revoked_at": "2025-03-01T13:00:00Z",
            "created_by": "token:root",
        },
        {
            "name": "bootstrap",
            "role": "admin",
            "created_at": "2025-03-01T12:00:00Z",
            "expires_at": None,
            "revoked_at": None,
            "created_by": "",
        },
    ]
    assert ok(addr, "tokens", "list").splitlines() == [
        "NAME       ROLE    CREATED               EXPIRES                         "
        "REVOKED               BY",
        "root-2     admin   2025-03-01 12:00 UTC  never                           "
        "-                     token:root",
        "old        viewer  2025-03-01 12:00 UTC  2025-03-02 12:00 UTC (expired)  "
        "2025-03-01 13:00 UTC  token:root",
        "bootstrap  admin   2025-03-01 12:00 UTC  never                           "
        "-                     -",
    ]
    fake.tokens = []
    assert ok(addr, "tokens", "list") == (
        "no API tokens yet (upgradectl tokens create --role ROLE --name NAME)\n"
    )


def test_tokens_revoke(addr: str, fake: FakeController) -> None:
    ok(addr, "tokens", "create", "--role", "operator", "--name", "ci.deploy_1")
    assert ok(addr, "tokens", "revoke", "ci.deploy_1") == (
        "revoked token ci.deploy_1 (role operator) at 2025-03-01 13:00 UTC: the controller "
        "refuses it from now on\n"
    )
    assert fake.token_requests[-1].name == "ci.deploy_1"
    code, _, err = cli(addr, "tokens", "revoke", "nope")
    assert (code, err) == (ExitCode.REJECTED, "upgradectl: error: no token named nope\n")
    calls = len(fake.calls)
    code, _, err = cli(addr, "tokens", "revoke", "no/slash")
    assert code == ExitCode.USAGE
    assert "argument NAME: expected a token name of 1 to 64 letters" in err
    assert len(fake.calls) == calls


def _audit_events() -> list[Any]:
    return [
        controller_pb2.AuditEvent(
            seq=3, at=_ts(7205), actor="token:ci", peer="ipv4:10.0.0.9:51234",
            action="StartUpgrade", detail="version=1.2.0 gateways=gw-1,gw-2",
            outcome="PERMISSION_DENIED: StartUpgrade needs the operator role",
        ),
        controller_pb2.AuditEvent(
            seq=2, at=_ts(3600), actor="token:root", peer="ipv4:127.0.0.1:40000",
            action="CreateToken", detail="name=ci role=viewer", outcome="OK",
        ),
        controller_pb2.AuditEvent(
            seq=1, at=_ts(), actor="controller", action="SyncReleases", outcome="OK",
        ),
    ]  # fmt: skip


def test_audit_table_and_json_newest_first(addr: str, fake: FakeController) -> None:
    fake.audit = _audit_events()
    data = json.loads(ok(addr, "audit", "--json"))
    assert [e["seq"] for e in data] == [3, 2, 1]
    assert data[0] == {
        "seq": 3,
        "at": "2025-03-01T14:00:05Z",
        "actor": "token:ci",
        "peer": "ipv4:10.0.0.9:51234",
        "action": "StartUpgrade",
        "detail": "version=1.2.0 gateways=gw-1,gw-2",
        "outcome": "PERMISSION_DENIED: StartUpgrade needs the operator role",
    }
    assert data[2]["peer"] == "" and data[2]["detail"] == ""
    assert not fake.audit_requests[0].HasField("since")
    lines = ok(addr, "audit").splitlines()
    assert [re.split(" {2,}", line) for line in lines] == [
        ["SEQ", "AT", "ACTOR", "PEER", "ACTION", "DETAIL", "OUTCOME"],
        ["3", "2025-03-01 14:00:05 UTC", "token:ci", "ipv4:10.0.0.9:51234", "StartUpgrade",
         "version=1.2.0 gateways=gw-1,gw-2",
         "PERMISSION_DENIED: StartUpgrade needs the operator role"],
        ["2", "2025-03-01 13:00:00 UTC", "token:root", "ipv4:127.0.0.1:40000", "CreateToken",
         "name=ci role=viewer", "OK"],
        ["1", "2025-03-01 12:00:00 UTC", "controller", "-", "SyncReleases", "-", "OK"],
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        ("2025-03-01T13:00:00Z", "2025-03-01T13:00:00+00:00"),
        ("2025-03-01T15:00:00+02:00", "2025-03-01T13:00:00+00:00"),
        ("2025-03-01T13:00", "2025-03-01T13:00:00+00:00"),  # UTC unless it names an offset
        ("2025-03-01 13:00:00 UTC", "2025-03-01T13:00:00+00:00"),  # as the table shows it
        ("2025-03-02", "2025-03-02T00:00:00+00:00"),
    ],
)
def test_audit_since_a_time(addr: str, fake: FakeController, since: str, expected: str) -> None:
    fake.audit = _audit_events()
    data = json.loads(ok(addr, "audit", "--since", since, "--json"))
    (request,) = fake.audit_requests
    assert request.since.ToDatetime(tzinfo=UTC).isoformat() == expected
    at = datetime.fromisoformat(expected)
    assert [e["seq"] for e in data] == [
        e.seq for e in _audit_events() if e.at.ToDatetime(tzinfo=UTC) >= at
    ]


@pytest.mark.parametrize(("since", "back"), [("2h", 7200), ("7d", 7 * 86400), ("90s", 90)])
def test_audit_since_a_duration_back_from_now(
    addr: str, fake: FakeController, since: str, back: int
) -> None:
    before = datetime.now(UTC).timestamp()
    ok(addr, "audit", "--since", since)
    after = datetime.now(UTC).timestamp()
    (request,) = fake.audit_requests
    sent = request.since.ToDatetime(tzinfo=UTC).timestamp()
    assert before - back <= sent <= after - back


def test_audit_with_nothing_since_says_so(addr: str, fake: FakeController) -> None:
    fake.audit = _audit_events()
    assert ok(addr, "audit", "--since", "2025-03-02T00:00:00Z") == (
        "no audit events since 2025-03-02 00:00:00 UTC\n"
    )
    fake.audit = []
    assert ok(addr, "audit") == "no audit events\n"


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        (
            "yesterday",
            "argument --since: expected a time, ISO 8601 (e.g. 2025-03-01T12:00:00Z; "
            "UTC unless it names an offset), or a duration back from now, a whole "
            "number and a unit, s, m, h or d (e.g. 90d, 12h, 30m, 3600s), not "
            "'yesterday'",
        ),
        ("2025-13-01", "argument --since: expected a time, ISO 8601"),
        ("2h30m", "argument --since: expected a time, ISO 8601"),
        ("0h", "argument --since: expected a duration of at least 1s, not '0h'"),
        ("99999d", "argument --since: expected a duration of at most 3650d, not '99999d'"),
    ],
)
def test_audit_since_usage_errors(
    addr: str, fake: FakeController, since: str, expected: str
) -> None:
    code, out, err = cli(addr, "audit", f"--since={since}")
    assert (code, out) == (ExitCode.USAGE, "")
    assert expected in err, err
    assert fake.calls == []


def test_retry_commands_name_the_token_file_never_the_secret(
    addr: str, fake: FakeController, tmp_path: Path
) -> None:
    path = _token_file(tmp_path, SECRET)
    fake.unavailable["StartUpgrade"] = 1000
    code, _, err = cli(addr, "--token-file", path, "upgrade", "--version", "1.2.0",
                       "--allow-downgrade")  # fmt: skip
    assert code == ExitCode.UNCONFIRMED
    assert _retry_argv(err)[:5] == ["upgradectl", "--controller", addr, "--token-file", path]
    assert SECRET not in err
    assert all(sent == [f"Bearer {SECRET}"] for sent in _auth(fake))


def _parser_actions(parser: argparse.ArgumentParser, path: str = "upgradectl") -> Iterator[Any]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parser_actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_flag_has_help() -> None:
    missing = [
        f"{path} {'/'.join(action.option_strings) or action.dest}"
        for path, action in _parser_actions(_build_parser())
        if not action.help
    ]
    assert missing == []


def test_start_up_leaves_what_only_some_commands_need_unloaded() -> None:
    # Every call pays for upgradectl's imports: python-tuf and the release builder load
    # only in the commands that sign, publish or build.
    probe = (
        "import sys, upgradectl.cli; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'tuf', "
        "'securesystemslib'} | {m for m in sys.modules if m in ('upgradectl.signing', "
        "'upgradectl.build')})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == [], done.stdout
