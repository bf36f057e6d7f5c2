"""A few slow clients never lock everyone out of the controller's gRPC server.

Budgets per kind of call (controller_svc.limits) against a real controller: watch streams
held open, downloads whose client stops reading and uploads whose client stops sending
take only their own budget; the call over a budget is refused with RESOURCE_EXHAUSTED and
a sentence that says what is full and to retry later; stalled streams are cancelled after
their bound, and their slots come back. The budgets themselves are unit-tested first.

Operators call the API port over TLS with an API token; downloads are a gateway's, enrolled
through the Enrollment service, on the gateway port with its client certificate.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller_svc import db
from controller_svc.app import ControllerApp
from controller_svc.limits import (
    DEFAULT_LIMITS,
    LIFETIME_GRACE_S,
    Admission,
    Budget,
    Kind,
    Limits,
    Refused,
    kind_of,
    peer_host,
)
from controller_svc.repository import Repository
from controller_svc.store import ArtifactStore
from gateway_daemon import identity
from gateway_daemon.download import download
from gateway_daemon.errors import DownloadFailed
from gateway_daemon.identity import Identity
from hitless import api
from hitless.backoff import Backoff
from hitless.config import BusConfig, ControllerConfig, HostPort
from hitless.trust import keys, release
from hitless.v1 import artifacts_pb2, artifacts_pb2_grpc, controller_pb2, controller_pb2_grpc
from tests.support.fleet import Fleet, bearer
from tests.support.procs import Procs, free_port
from tests.support.rabbit import amqp_url
from tests.support.stamped import stamped
from tests.support.wait import wait_for

# A client that stops reading blocks the server after one chunk when it does not probe the
# bandwidth-delay product (with grpcio's default window, after about 20 MB).
STALLING_CLIENT = [("grpc.http2.bdp_probe", 0)]
FAST_BUSY = Backoff(initial_s=0.05, max_s=0.2)
ARTIFACT_SIZE = 4 * 1024 * 1024 + 17
QUICK_S = 3.0  # a call that is not stuck answers well within this


# -- the budgets, without a server -------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_full_budget_refuses_saying_what_is_full_and_what_to_do() -> None:
    admission = Admission(Limits(download=Budget(2, per_peer=2)))
    slots = [admission.admit(Kind.DOWNLOAD, "10.0.0.1", "/D", lambda: None) for _ in range(2)]
    with pytest.raises(Refused) as refused:
        admission.admit(Kind.DOWNLOAD, "10.0.0.2", "/hitless.v1.Artifacts/Download", lambda: None)
    message = str(refused.value)
    assert "limit of 2 artifact downloads" in message
    assert "/hitless.v1.Artifacts/Download was not started" in message
    assert message.endswith("retry later")
    # Other kinds are untouched by a full download budget.
    admission.admit(Kind.WATCH, "10.0.0.2", "/W", lambda: None)
    slots[0].release()
    slots[0].release()  # twice changes nothing
    assert admission.in_use(Kind.DOWNLOAD) == 1
    admission.admit(Kind.DOWNLOAD, "10.0.0.2", "/D", lambda: None)


def test_one_host_cannot_take_a_whole_budget() -> None:
    admission = Admission(Limits(watch=Budget(4, per_peer=2)))
    for _ in range(2):
        admission.admit(Kind.WATCH, "10.0.0.1", "/W", lambda: None)
    with pytest.raises(Refused, match=r"10\.0\.0\.1 already has 2 watch streams .* retry later"):
        admission.admit(Kind.WATCH, "10.0.0.1", "/W", lambda: None)
    admission.admit(Kind.WATCH, "10.0.0.2", "/W", lambda: None)
    assert admission.in_use(Kind.WATCH) == 3
    assert admission.in_use(Kind.WATCH, "10.0.0.1") == 2


def test_watchdog_cancels_a_stream_blocked_on_its_client_not_one_that_waits_for_work() -> None:
    clock = FakeClock()
    admission = Admission(Limits(download=Budget(4, stall_s=30.0)), clock)
    cancelled: list[str] = []
    stuck = admission.admit(Kind.DOWNLOAD, "a", "/D", lambda: cancelled.append("stuck"))
    busy = admission.admit(Kind.DOWNLOAD, "b", "/D", lambda: cancelled.append("busy"))
    stuck.blocked()
    busy.blocked()
    clock.now += 29.0
    busy.unblocked()  # its client read the message
    assert admission.sweep() == 0
    clock.now += 1.0
    assert admission.sweep() == 1
    assert cancelled == ["stuck"]
    assert stuck.cancelled is not None and "30 s" in stuck.cancelled
    clock.now += 100.0
    assert admission.sweep() == 0, "a call is cancelled once, and one not blocked never"


def test_watchdog_cancels_a_watch_past_its_lifetime() -> None:
    clock = FakeClock()
    admission = Admission(Limits(watch=Budget(4, lifetime_s=300.0)), clock)
    cancelled: list[bool] = []
    admission.admit(Kind.WATCH, "a", "/W", lambda: cancelled.append(True))
    clock.now += 300.0 + LIFETIME_GRACE_S - 0.1
    assert admission.sweep() == 0
    clock.now += 0.1
    assert admission.sweep() == 1 and cancelled == [True]


def test_limits_fit_the_thread_pool_and_reject_nonsense() -> None:
    limits = DEFAULT_LIMITS
    budgets = sum(limits.budget(k).total for k in Kind)
    assert limits.workers == budgets + limits.spare_workers
    assert limits.max_concurrent_rpcs > limits.workers
    assert limits.download_time_s(64 * 1024) == limits.download_slack_s + 1
    for bad in (
        lambda: Budget(0),
        lambda: Budget(2, per_peer=3),
        lambda: Budget(2, stall_s=0),
        lambda: Limits(spare_workers=0),
    ):
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:53122", "10.0.0.7"),
        ("ipv6:[::1]:53122", "::1"),
        ("ipv6:%5B::1%5D:53122", "::1"),
        ("ipv6:[::ffff:10.0.0.7]:53122", "10.0.0.7"),
        ("unix:/run/hitless.sock", "unix:/run/hitless.sock"),
    ],
)
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_kinds() -> None:
    assert kind_of("/hitless.v1.Controller/WatchJob", streaming=True) is Kind.WATCH
    assert kind_of("/hitless.v1.Artifacts/Download", streaming=True) is Kind.DOWNLOAD
    assert kind_of("/hitless.v1.Controller/PublishRelease", streaming=True) is Kind.UPLOAD
    assert kind_of("/hitless.v1.Controller/ListGateways", streaming=False) is Kind.UNARY


# -- a real controller -------------------------------------------------------------


def authed(
    address: str, ca_pem: bytes, token: str, options: list[tuple[str, Any]] | None = None
) -> Any:
    """A TLS channel to the API port ``address`` (trusting ``ca_pem``) whose calls carry
    the API token ``token``."""
    channel = grpc.secure_channel(
        address, grpc.ssl_channel_credentials(ca_pem), options=options or []
    )
    return grpc.intercept_channel(channel, bearer(token))


def enroll(api: str, ca_pem: bytes, code: str, gateway_id: str, state_dir: Path) -> Identity:
    """Gateway ``gateway_id`` enrolled at the API port ``api`` with ``code``, as
    ``gateway-daemon enroll`` does: its certificate for the gateway port."""
    return identity.enroll(state_dir, gateway_id, HostPort.parse(api), ca_pem, code)


@dataclass
class Controller:
    address: str
    repo: Repository
    store: ArtifactStore
    app: ControllerApp
    token: str
    ca_pem: bytes
    gateway: Identity  # gw-1, enrolled

    def channel(self, options: list[tuple[str, Any]] | None = None) -> Any:
        """An operator's channel to the API port, with the admin token."""
        return authed(self.address, self.ca_pem, self.token, options)

    def gateway_channel(self, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        """gw-1's channel to the gateway port, with its client certificate."""
        address = str(self.gateway.download_address(HostPort.parse(self.address)))
        return grpc.secure_channel(
            address, self.gateway.channel_credentials(), options=options or []
        )


@contextmanager
def running_controller(tmp_path: Path, bus: BusConfig, limits: Limits) -> Iterator[Controller]:
    """The controller (ControllerApp: bus, SQLite, store, gRPC server) in this process,
    with ``limits``; stopped afterwards."""
    data = tmp_path / "controller"
    config = ControllerConfig(
        listen=HostPort("127.0.0.1", free_port()),
        db_url=f"sqlite:///{data / 'controller.db'}",
        bus=bus,
        data_dir=data,
        self_upgrade=False,
        trust_root=keys.init(tmp_path / "keys").root_json,
        gateway_listen=HostPort("127.0.0.1", 0),
    )
    app = ControllerApp(config, limits=limits)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            app.run()
        except BaseException as exc:
            failed.append(exc)
            raise

    thread = threading.Thread(target=run, name="controller", daemon=True)
    thread.start()
    address = f"127.0.0.1:{config.listen.port}"
    token_file = data / "admin.token"
    wait_for(
        lambda: token_file.exists() and bool(token_file.read_text().strip()),
        timeout=30,
        what="the controller's first admin token",
    )
    token = token_file.read_text().strip()
    ca_pem = config.pki_dir.joinpath("ca.pem").read_bytes()
    with authed(address, ca_pem, token) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)

        def answers() -> bool:
            if failed:
                raise AssertionError(f"the controller failed to start: {failed[0]!r}")
            try:
                stub.ListReleases(controller_pb2.ListReleasesRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return True

        wait_for(answers, timeout=30, what="the controller to answer")
        request = controller_pb2.CreateEnrollmentRequest(gateway_id="gw-1")
        code = stub.CreateEnrollment(request, timeout=QUICK_S).code
    gateway = enroll(address, ca_pem, code, "gw-1", tmp_path / "gw-1")
    engine = db.make_engine(config.db_url)
    try:
        yield Controller(
            address,
            Repository(engine),
            ArtifactStore(config.artifact_dir),
            app,
            token,
            ca_pem,
            gateway,
        )
    finally:
        app.stop()
        thread.join(timeout=30)
        engine.dispose()
        assert not thread.is_alive(), "the controller did not stop"


def pending_job(repo: Repository, store: ArtifactStore) -> tuple[str, str]:
    """A job that stays PENDING (nobody dispatches it) and its artifact's sha256."""
    stored = store.put([os.urandom(ARTIFACT_SIZE)])
    now = datetime.now(UTC)
    repo.add_release("1.0.0", stored.sha256, stored.size, "", now)
    job, _ = repo.create_job(
        "1.0.0", [("gw-1", "0.9.0")], deadline=now + timedelta(hours=1), now=now
    )
    return job.id, stored.sha256


@dataclass
class Opened:
    held: list[Any]
    refused: list[grpc.RpcError]


def open_watches(stack: ExitStack, ctl: Controller | Fleet, job_id: str, count: int) -> Opened:
    """``count`` WatchJob streams, each on its own connection; those admitted are held
    open (their first event read), the others were refused."""
    if isinstance(ctl, Controller):
        address, ca_pem = ctl.address, ctl.ca_pem
    else:
        address, ca_pem = ctl.controller_address, ctl.ca_cert.read_bytes()
    opened = Opened([], [])
    for _ in range(count):
        channel = stack.enter_context(authed(address, ca_pem, ctl.token))
        call = controller_pb2_grpc.ControllerStub(channel).WatchJob(
            controller_pb2.WatchJobRequest(job_id=job_id)
        )
        stack.callback(call.cancel)
        try:
            next(call)
            opened.held.append(call)
        except grpc.RpcError as exc:
            opened.refused.append(exc)
    return opened


def timed(call: Callable[[], Any]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def list_gateways(ctl: Controller) -> None:
    with ctl.channel() as channel:
        controller_pb2_grpc.ControllerStub(channel).ListGateways(
            controller_pb2.ListGatewaysRequest(), timeout=QUICK_S
        )


def fetch(api: str, gateway: Identity, sha256: str, dest: Path, **options: Any) -> bytes:
    """What ``gateway`` downloads of ``sha256`` from the gateway port of the controller
    whose API port is ``api`` (the port enrollment named), as its agent does."""
    result = download(
        gateway.download_address(HostPort.parse(api)), sha256, ARTIFACT_SIZE, dest,
        credentials=gateway.channel_credentials(), **options,
    )  # fmt: skip
    return result.path.read_bytes()


def test_watch_streams_held_open_leave_other_calls_and_downloads_alone(
    tmp_path: Path, bus: BusConfig
) -> None:
    limits = Limits(watch=Budget(6, per_peer=6, lifetime_s=120.0))
    with running_controller(tmp_path, bus, limits) as ctl, ExitStack() as stack:
        job_id, sha = pending_job(ctl.repo, ctl.store)
        opened = open_watches(stack, ctl, job_id, 32)
        assert len(opened.held) == 6
        assert len(opened.refused) == 26
        for exc in opened.refused:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 6 watch streams" in (exc.details() or "")
            assert "retry later" in (exc.details() or "")
        assert timed(lambda: list_gateways(ctl)) < QUICK_S
        data = fetch(ctl.address, ctl.gateway, sha, tmp_path / "gw" / "a.pyz")
        assert data == ctl.store.path(sha).read_bytes()
        # The watches held open still work, and closing them gives their slots back.
        assert all(call.is_active() for call in opened.held)
        for call in opened.held:
            call.cancel()
        again = wait_for(
            lambda: open_watches(stack, ctl, job_id, 1).held,
            timeout=10,
            what="a watch to be admitted once the others closed",
        )
        assert len(again) == 1


def test_a_host_over_its_share_of_watches_is_refused(tmp_path: Path, bus: BusConfig) -> None:
    limits = Limits(watch=Budget(8, per_peer=2, lifetime_s=120.0))
    with running_controller(tmp_path, bus, limits) as ctl, ExitStack() as stack:
        job_id, _ = pending_job(ctl.repo, ctl.store)
        opened = open_watches(stack, ctl, job_id, 3)
        assert len(opened.held) == 2
        [exc] = opened.refused
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "127.0.0.1 already has 2 watch streams" in (exc.details() or "")
        assert "close one or retry later" in (exc.details() or "")


def test_a_watch_ends_at_its_lifetime_saying_where_to_resume(
    tmp_path: Path, bus: BusConfig
) -> None:
    limits = Limits(watch=Budget(4, lifetime_s=1.0))
    with running_controller(tmp_path, bus, limits) as ctl, ctl.channel() as channel:
        job_id, _ = pending_job(ctl.repo, ctl.store)
        stub = controller_pb2_grpc.ControllerStub(channel)
        seen = []
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            for event in stub.WatchJob(controller_pb2.WatchJobRequest(job_id=job_id), timeout=30):
                seen.append(event.seq)
        assert time.monotonic() - started >= 1.0
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"lifetime of 1 s; resume after event {seen[-1]}" in (ended.value.details() or "")
        # Resuming after that event sends nothing twice. (Events the job gained meanwhile
        # may come: a busy machine can let the controller act on the job in between.)
        request = controller_pb2.WatchJobRequest(job_id=job_id, after_seq=seen[-1])
        resumed = stub.WatchJob(request, timeout=30)
        again = []
        with pytest.raises(grpc.RpcError):
            for event in resumed:
                again.append(event.seq)
        assert all(seq > seen[-1] for seq in again), f"sent again: {again} after {seen}"
        assert resumed.code() == grpc.StatusCode.UNAVAILABLE
        assert f"resume after event {(again or seen)[-1]}" in (resumed.details() or "")
        # Each stream said the controller took it: a client counts its retries from the cut.
        assert api.WATCH_OPEN in tuple(resumed.initial_metadata() or ())


def stalled_downloads(stack: ExitStack, ctl: Controller, sha: str, count: int) -> list[Any]:
    """``count`` Download streams of gw-1 whose client read one chunk and then stopped
    reading."""
    calls = []
    for _ in range(count):
        channel = stack.enter_context(ctl.gateway_channel(STALLING_CLIENT))
        call = artifacts_pb2_grpc.ArtifactsStub(channel).Download(
            artifacts_pb2.DownloadRequest(sha256=sha, offset=0)
        )
        stack.callback(call.cancel)
        next(call)
        calls.append(call)
    return calls


def test_downloads_that_stop_reading_are_ended_and_others_get_through(
    tmp_path: Path, bus: BusConfig
) -> None:
    limits = Limits(download=Budget(3, per_peer=3, stall_s=1.0), check_interval_s=0.1)
    with running_controller(tmp_path, bus, limits) as ctl, ExitStack() as stack:
        _, sha = pending_job(ctl.repo, ctl.store)
        started = time.monotonic()
        stalled = stalled_downloads(stack, ctl, sha, 3)
        # While they hold every download slot: the next download is refused, at once,
        # and the rest of the API answers.
        with pytest.raises(grpc.RpcError) as refused, ctl.gateway_channel() as channel:
            next(
                artifacts_pb2_grpc.ArtifactsStub(channel).Download(
                    artifacts_pb2.DownloadRequest(sha256=sha), timeout=QUICK_S
                )
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 3 artifact downloads" in (refused.value.details() or "")
        assert timed(lambda: list_gateways(ctl)) < QUICK_S
        # A gateway that asks now is turned away, waits, and gets its artifact once the
        # stalled streams are ended.
        got: list[bytes | BaseException] = []

        def gateway() -> None:
            try:
                dest = tmp_path / "gw" / "a.pyz"
                # max_attempts=1: being turned away is waiting, not a failed attempt.
                data = fetch(
                    ctl.address, ctl.gateway, sha, dest,
                    busy_backoff=FAST_BUSY, busy_timeout_s=20, max_attempts=1,
                )  # fmt: skip
                got.append(data)
            except BaseException as exc:
                got.append(exc)

        fetcher = threading.Thread(target=gateway)
        fetcher.start()
        fetcher.join(timeout=30)
        assert got == [ctl.store.path(sha).read_bytes()]
        assert time.monotonic() - started >= 1.0, "a slot came back before its client stalled 1 s"
        wait_for(
            lambda: _slots_free(ctl, sha, 3),
            timeout=10,
            what="every stalled download to be ended and its slot given back",
        )
        # The stalled clients find their streams cancelled once they read again.
        for call in stalled:
            received = 0
            with pytest.raises(grpc.RpcError):
                for chunk in call:
                    received += len(chunk.data)
            assert call.code() == grpc.StatusCode.CANCELLED
            assert received < ARTIFACT_SIZE


def _slots_free(ctl: Controller, sha: str, count: int) -> bool:
    """Whether ``count`` downloads are admitted at once now (they are closed again)."""
    with ExitStack() as stack:
        try:
            stalled_downloads(stack, ctl, sha, count)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return False
    return True


def test_a_gateway_gives_up_when_the_controller_stays_busy(tmp_path: Path, bus: BusConfig) -> None:
    limits = Limits(download=Budget(1, per_peer=1, stall_s=60.0))
    with running_controller(tmp_path, bus, limits) as ctl, ExitStack() as stack:
        _, sha = pending_job(ctl.repo, ctl.store)
        stalled_downloads(stack, ctl, sha, 1)
        with pytest.raises(DownloadFailed, match=r"stayed busy .*RESOURCE_EXHAUSTED"):
            fetch(
                ctl.address, ctl.gateway, sha, tmp_path / "a.pyz",
                busy_backoff=FAST_BUSY, busy_timeout_s=0.5,
            )  # fmt: skip


def test_an_upload_that_stops_sending_is_ended_and_frees_its_slot(
    tmp_path: Path, bus: BusConfig
) -> None:
    limits = Limits(upload=Budget(1, per_peer=1, stall_s=1.0), check_interval_s=0.1)
    with running_controller(tmp_path, bus, limits) as ctl, ctl.channel() as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        resume = threading.Event()
        sent = threading.Event()
        artifact = tmp_path / "2.0.0.pyz"
        artifact.write_bytes(stamped("2.0.0"))
        targets = release.sign_targets(
            None, tmp_path / "keys", add={release.target_name("2.0.0"): artifact}
        )

        def stalling() -> Iterator[Any]:
            yield controller_pb2.PublishReleaseRequest(
                metadata=controller_pb2.ReleaseMetadata(version="2.0.0", targets_metadata=targets)
            )
            sent.set()
            resume.wait(60)  # the client stops sending until the test ends

        stalled: Any = None

        def refused_while_stalled() -> bool:
            nonlocal stalled
            # The stalling upload is admitted when its call reaches a worker; a probe that
            # got there first takes the slot and turns it away: start it again then.
            if stalled is None or stalled.done():
                sent.clear()
                stalled = stub.PublishRelease.future(stalling())
                sent.wait(10)
            return _upload_refused(stub)

        try:
            wait_for(
                refused_while_stalled,
                timeout=10,
                what="a second upload to be refused while the first one stalls",
            )
            wait_for(stalled.done, timeout=10, what="the stalled upload to be ended")
            assert stalled.code() == grpc.StatusCode.CANCELLED
            # Its slot is back: the next upload is admitted (and judged on its content).
            with pytest.raises(grpc.RpcError) as judged:
                stub.PublishRelease(iter([]), timeout=QUICK_S)
            assert judged.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            resume.set()


def _upload_refused(stub: controller_pb2_grpc.ControllerStub) -> bool:
    try:
        stub.PublishRelease(iter([]), timeout=QUICK_S)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert "limit of 1 release uploads" in (exc.details() or "")
            return True
    return False


# -- the controller as operators run it, with its default limits --------------------


def test_default_controller_survives_forty_watches_from_one_host(
    procs: Procs, tmp_path: Path, vhost: str
) -> None:
    fleet = Fleet(procs, tmp_path, amqp_url(vhost))
    fleet.start_controller()
    engine = db.make_engine(f"sqlite:///{fleet.data_dir / 'controller.db'}")
    try:
        job_id, sha = pending_job(Repository(engine), ArtifactStore(fleet.data_dir / "artifacts"))
        with ExitStack() as stack:
            opened = open_watches(stack, fleet, job_id, 40)
            per_host = DEFAULT_LIMITS.watch.per_peer
            assert len(opened.held) == per_host
            assert {exc.code() for exc in opened.refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            listed = fleet.cli("gateways", "list", "--json")
            assert listed.returncode == 0
            gateway = enroll(
                fleet.controller_address, fleet.ca_cert.read_bytes(),
                fleet.enrollment_code("gw-1"), "gw-1", tmp_path / "gw-1",
            )  # fmt: skip
            data = fetch(fleet.controller_address, gateway, sha, tmp_path / "gw" / "a.pyz")
            assert len(data) == ARTIFACT_SIZE
            assert all(call.is_active() for call in opened.held)
    finally:
        engine.dispose()
        fleet.close()
