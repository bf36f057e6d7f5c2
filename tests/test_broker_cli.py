"""`controller-svc broker user`: a service's own broker user, made through the real
management API, with exactly the permissions README's table gives it."""

from __future__ import annotations

import os
import subprocess

import pika
import pika.exceptions
import pytest

from controller_svc.broker_access import SERVICE_GRANTS
from tests.support.fleet import MANAGEMENT_URL
from tests.support.procs import command
from tests.support.rabbit import Management


def _run(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [command("controller-svc"), "broker", "user", *args],
        env={**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_job_publisher_user_may_publish_jobs_and_nothing_else(
    rabbit: Management, vhost: str
) -> None:
    # The topology exists (as the controller declares it) before a passive user uses it.
    for exchange in ("hitless.jobs", "hitless.commands"):
        rabbit.request("PUT", f"/exchanges/{vhost}/{exchange}", {"type": "topic", "durable": True})
    name = f"{vhost}-publisher"
    made = _run(
        "--role", "job-publisher", "--name", name, "--vhost", vhost,
        env={"HITLESS_BROKER_API": MANAGEMENT_URL},
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    password = made.stdout.strip().splitlines()[-1].strip()
    assert "shown once" in made.stdout
    permissions = rabbit.request("GET", f"/users/{name}/permissions")
    expected = SERVICE_GRANTS["job-publisher"]
    assert [(p["vhost"], p["configure"], p["write"], p["read"]) for p in permissions] == [
        (vhost, expected.configure, expected.write, expected.read)
    ]

    params = pika.URLParameters(f"amqp://{name}:{password}@127.0.0.1:5672/{vhost}")
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("hitless.jobs", "upgrade", b"{}")  # allowed: no exception
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_publish("hitless.commands", "gateway.gw-1", b"{}")
        assert refused.value.reply_code == 403
    finally:
        connection.close()


def test_without_the_management_api_it_says_what_to_set(vhost: str) -> None:
    env = {"HITLESS_BROKER_API": "", "HITLESS_BROKER_API_FILE": ""}
    result = _run("--role", "notifier", "--name", f"{vhost}-n", env=env)
    assert result.returncode == 2
    assert "set HITLESS_BROKER_API" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_password_from_stdin_is_used_and_not_printed(rabbit: Management, vhost: str) -> None:
    name = f"{vhost}-notifier"
    made = _run(
        "--role", "notifier", "--name", name, "--vhost", vhost, "--password-stdin",
        env={"HITLESS_BROKER_API": MANAGEMENT_URL}, stdin="s3cret-from-a-vault\n",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "s3cret-from-a-vault" not in made.stdout + made.stderr
    rabbit.request("PUT", f"/queues/{vhost}/hitless.notifier.events", {"durable": True})
    params = pika.URLParameters(f"amqp://{name}:s3cret-from-a-vault@127.0.0.1:5672/{vhost}")
    connection = pika.BlockingConnection(params)
    try:
        connection.channel().queue_declare("hitless.notifier.events", passive=True)
    finally:
        connection.close()
