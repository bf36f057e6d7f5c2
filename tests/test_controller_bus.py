"""The controller process on the real broker: malformed messages are dead-lettered with
their reason and the consumer goes on; an unreachable broker is retried and said so."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from gateway_daemon import identity
from hitless.bus.topology import REPORTS
from hitless.trust import keys
from tests.support import certificates
from tests.support.fleet import Fleet
from tests.support.procs import Procs, command, free_port
from tests.support.rabbit import Management
from tests.support.wait import wait_for


def test_malformed_report_is_dead_lettered_and_the_consumer_goes_on(
    fleet: Fleet, rabbit: Management, vhost: str
) -> None:
    with fleet.as_gateway("gw-x") as publisher:
        publisher.publish(REPORTS, "gateway.gw-x.status", b"{not json", message_id="bad-1")
        bad = {"gateway_id": "gw-x", "version": "1.0.0", "flavour": 1}
        publisher.publish(
            REPORTS, "gateway.gw-x.heartbeat", json.dumps(bad).encode(), message_id="bad-2"
        )
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    good = json.dumps({"gateway_id": "gw-ok", "version": "1.0.0", "at": now})
    with fleet.as_gateway("gw-ok") as publisher:
        publisher.publish(REPORTS, "gateway.gw-ok.heartbeat", good.encode())

    wait_for(lambda: "gw-ok" in fleet.gateways(), timeout=15, what="the good heartbeat recorded")

    def dead() -> dict[str, str] | None:
        messages = rabbit.get_messages(vhost, "hitless.dead")
        found = {m["properties"].get("message_id"): m for m in messages}
        if {"bad-1", "bad-2"} <= found.keys():
            return {k: found[k]["properties"]["headers"]["x-hitless-reason"] for k in found}
        return None

    reasons = wait_for(dead, timeout=15, what="both bad reports dead-lettered")
    assert "hitless.v1.StatusReport" in reasons["bad-1"]
    assert "flavour" in reasons["bad-2"]
    bodies = {
        m["properties"]["message_id"]: m["payload"]
        for m in rabbit.get_messages(vhost, "hitless.dead")
    }
    assert bodies["bad-1"] == "{not json", "the body must reach the dead-letter queue untouched"
    assert "gw-x" not in fleet.gateways()


def test_gateway_retries_an_unreachable_broker_and_says_so(procs: Procs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    # Enrolled (an identity from a CA of the test's own): the broker is what is missing.
    ca = certificates.certificate_authority(tmp_path / "pki")
    identity.save(tmp_path / "gw-1", certificates.gateway_identity(ca, "gw-1", free_port()))
    gateway = procs.start(
        "gw-1",
        [
            command("gateway-daemon"),
            "run",
            "--id",
            "gw-1",
            "--amqp",
            dead_broker,
            "--state-dir",
            str(tmp_path / "gw-1"),
            "--trust-root",
            str(keys.init(tmp_path / "keys").root_json),
        ],
    )

    def retries() -> int:
        return sum(1 for line in gateway.log().splitlines() if '"bus_unreachable"' in line)

    wait_for(lambda: retries() >= 3, timeout=30, what="three logged retries", describe=gateway.log)
    assert gateway.popen.poll() is None, "the gateway must keep running while the broker is away"
    line = next(line for line in gateway.log().splitlines() if '"bus_unreachable"' in line)
    entry = json.loads(line)
    assert entry["broker"] == dead_broker.replace("guest:guest@", "guest@")
    assert "retry_in_s" in entry
