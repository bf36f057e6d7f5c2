"""Who may do what, against a real controller: API tokens with roles, refusals that say
which credential is missing or refused and change nothing, and the audit log of every
change, refused ones included."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hitless.v1 import controller_pb2, controller_pb2_grpc
from tests.support.fleet import Fleet
from tests.support.stamped import stamped
from tests.support.wait import wait_for


def _stub(fleet: Fleet, token: str | None) -> tuple[grpc.Channel, Any]:
    channel = fleet.channel()
    return channel, _Authed(controller_pb2_grpc.ControllerStub(channel), token)


class _Authed:
    """A stub whose calls carry ``token`` (none when None)."""

    def __init__(self, stub: Any, token: str | None) -> None:
        self._stub, self._token = stub, token

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        metadata = [("authorization", f"Bearer {self._token}")] if self._token else []

        def call(request: Any, **kwargs: Any) -> Any:
            return method(request, metadata=metadata, timeout=30, **kwargs)

        return call


@pytest.fixture
def admin(fleet: Fleet) -> Iterator[Any]:
    channel, stub = _stub(fleet, fleet.token)
    with channel:
        yield stub


def _token(admin: Any, name: str, role: str, expires_seconds: int = 0) -> str:
    created = admin.CreateToken(
        controller_pb2.CreateTokenRequest(name=name, role=role, expires_seconds=expires_seconds)
    )
    assert created.token.role == role and created.secret.startswith("hlt_")
    secret: str = created.secret
    return secret


def _refused(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value
    return caught.value.details() or ""


def _audit(admin: Any) -> list[Any]:
    return list(admin.ListAudit(controller_pb2.ListAuditRequest()).events)


def _start(version: str = "9.9.9") -> controller_pb2.StartUpgradeRequest:
    return controller_pb2.StartUpgradeRequest(version=version)


def test_the_first_start_makes_one_admin_token_in_a_private_file(fleet: Fleet) -> None:
    token_file = fleet.data_dir / "admin.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert fleet.controller is not None
    assert str(token_file) in fleet.controller.log()
    (token,) = fleet.stub().ListTokens(controller_pb2.ListTokensRequest(), timeout=10).tokens
    assert (token.name, token.role) == ("bootstrap-admin", "admin")


def test_a_call_without_a_token_is_refused_saying_what_is_missing(fleet: Fleet, admin: Any) -> None:
    channel, anonymous = _stub(fleet, None)
    with channel:
        details = _refused(
            lambda: anonymous.ListGateways(controller_pb2.ListGatewaysRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert "this call needs an API token" in details
        assert "HITLESS_TOKEN" in details
        _refused(lambda: anonymous.StartUpgrade(_start()), grpc.StatusCode.UNAUTHENTICATED)
    (row,) = [e for e in _audit(admin) if e.action == "StartUpgrade"]
    assert row.actor == "anonymous" and row.outcome.startswith("UNAUTHENTICATED")
    assert admin.ListJobs(controller_pb2.ListJobsRequest()).jobs == []


def test_an_unknown_token_is_refused(fleet: Fleet) -> None:
    channel, stranger = _stub(fleet, "hlt_not-one-of-ours")
    with channel:
        details = _refused(
            lambda: stranger.ListReleases(controller_pb2.ListReleasesRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    assert "not one this controller issued" in details


def test_an_expired_token_is_refused(fleet: Fleet, admin: Any) -> None:
    secret = _token(admin, "brief", "viewer", expires_seconds=1)
    channel, brief = _stub(fleet, secret)
    with channel:

        def refused() -> str | None:
            try:
                brief.ListGateways(controller_pb2.ListGatewaysRequest())
            except grpc.RpcError as exc:
                return exc.details() if exc.code() == grpc.StatusCode.UNAUTHENTICATED else None
            return None

        details = wait_for(refused, timeout=10, what="the token to expire", interval=0.2)
    assert "the API token brief expired at" in details


def test_a_revoked_token_is_refused_from_the_next_call(fleet: Fleet, admin: Any) -> None:
    secret = _token(admin, "leaver", "operator")
    channel, leaver = _stub(fleet, secret)
    with channel:
        leaver.ListGateways(controller_pb2.ListGatewaysRequest())
        revoked = admin.RevokeToken(controller_pb2.RevokeTokenRequest(name="leaver"))
        assert revoked.HasField("revoked_at")
        details = _refused(
            lambda: leaver.ListGateways(controller_pb2.ListGatewaysRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    assert "the API token leaver was revoked at" in details


def test_a_viewer_cannot_start_an_upgrade(fleet: Fleet, admin: Any) -> None:
    channel, viewer = _stub(fleet, _token(admin, "watcher", "viewer"))
    with channel:
        viewer.ListJobs(controller_pb2.ListJobsRequest())  # reading is allowed
        details = _refused(lambda: viewer.StartUpgrade(_start()), grpc.StatusCode.PERMISSION_DENIED)
    assert "token:watcher has the role viewer, and StartUpgrade needs operator" in details
    assert admin.ListJobs(controller_pb2.ListJobsRequest()).jobs == []
    (row,) = [e for e in _audit(admin) if e.action == "StartUpgrade"]
    assert row.actor == "token:watcher" and row.outcome.startswith("PERMISSION_DENIED")


def test_an_operator_cannot_publish_a_release(fleet: Fleet, admin: Any, tmp_path: Path) -> None:
    artifact = tmp_path / "a.pyz"
    artifact.write_bytes(stamped("1.1.0"))
    targets = fleet.signed_targets("1.1.0", artifact)
    channel, operator = _stub(fleet, _token(admin, "ops", "operator"))

    def parts() -> Iterator[controller_pb2.PublishReleaseRequest]:
        yield controller_pb2.PublishReleaseRequest(
            metadata=controller_pb2.ReleaseMetadata(version="1.1.0", targets_metadata=targets)
        )
        yield controller_pb2.PublishReleaseRequest(chunk=artifact.read_bytes())

    with channel:
        details = _refused(
            lambda: operator.PublishRelease(parts()), grpc.StatusCode.PERMISSION_DENIED
        )
        _refused(
            lambda: operator.CreateToken(
                controller_pb2.CreateTokenRequest(name="mine", role="admin")
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    assert "PublishRelease needs admin" in details
    assert admin.ListReleases(controller_pb2.ListReleasesRequest()).releases == []
    assert not list((fleet.data_dir / "artifacts").glob("??/*"))
    assert [t.name for t in admin.ListTokens(controller_pb2.ListTokensRequest()).tokens] == [
        "bootstrap-admin",
        "ops",
    ]


def test_every_change_is_an_audit_row_with_who_and_the_outcome(
    fleet: Fleet, admin: Any, tmp_path: Path
) -> None:
    started = datetime.now(UTC)
    fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": "1.0.0"})
    fleet.release("1.1.0")
    channel, operator = _stub(fleet, _token(admin, "ops", "operator"))
    with channel:
        job = operator.StartUpgrade(
            controller_pb2.StartUpgradeRequest(version="1.1.0", request_id="audit-1")
        )
        _refused(lambda: operator.StartUpgrade(_start("7.7.7")), grpc.StatusCode.NOT_FOUND)
    rows = {(e.action, e.actor): e for e in _audit(admin)}
    assert rows["CreateToken", "token:bootstrap-admin"].outcome == "OK"
    assert 'name: "ops"' in rows["CreateToken", "token:bootstrap-admin"].detail
    published = rows["PublishRelease", "token:bootstrap-admin"]
    assert published.outcome == "OK" and 'version: "1.1.0"' in published.detail
    assert "targets_metadata" not in published.detail  # bytes are left out
    starts = [e for e in _audit(admin) if e.action == "StartUpgrade"]
    assert [e.outcome.split(":")[0] for e in starts] == ["NOT_FOUND", "OK"]  # newest first
    assert all(e.actor == "token:ops" and e.peer == "127.0.0.1" for e in starts)
    assert 'request_id: "audit-1"' in starts[1].detail
    assert job.job_id
    since = controller_pb2.ListAuditRequest()
    since.since.FromDatetime(started)
    assert len(admin.ListAudit(since).events) == len(_audit(admin))
    # Reading is not a change: no rows for it.
    assert not [e for e in _audit(admin) if e.action in ("ListGateways", "ListAudit")]


def test_server_reflection_needs_a_token(fleet: Fleet) -> None:
    with fleet.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = [("authorization", f"Bearer {fleet.token}")]
        answers = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert "hitless.v1.Controller" in names


def test_a_list_call_answers_a_bounded_number_of_rows(admin: Any) -> None:
    calls = [
        (admin.ListJobs, controller_pb2.ListJobsRequest(limit=1_000_000)),
        (admin.ListJobs, controller_pb2.ListJobsRequest(limit=-1)),
        (admin.ListAudit, controller_pb2.ListAuditRequest(limit=1001)),
    ]
    for method, request in calls:
        details = _refused(
            lambda method=method, request=request: method(request),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "outside 1 to 1000" in details, details
    admin.ListJobs(controller_pb2.ListJobsRequest(limit=1000))
    assert len(admin.ListAudit(controller_pb2.ListAuditRequest(limit=1)).events) <= 1
