"""The notifier's configuration: flags, environment, validation; and its ledger on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from hitless.config import HostPort
from hitless.errors import ConfigError
from notifier import cli
from notifier.config import NotifierConfig, SmtpConfig
from notifier.ledger import Ledger, State


def build(argv: list[str], environ: dict[str, str] | None = None) -> NotifierConfig:
    args = cli._parser().parse_args(["run", *argv])
    return cli.build_config(args, environ or {})


def test_defaults_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HITLESS_DATA_DIR", str(tmp_path))
    settings = build([])
    assert settings.smtp.server == HostPort("127.0.0.1", 25)
    assert not settings.smtp.starttls and settings.smtp.user is None
    assert settings.state_path == tmp_path / "notifier.db"
    assert settings.sender == "hitless@localhost"

    settings = build(
        ["--smtp", "mail.example.com:587", "--smtp-starttls", "--smtp-user", "bot",
         "--from", "fleet@example.com", "--state", str(tmp_path / "x.db")],
        {"HITLESS_SMTP_PASSWORD": "s3cret"},
    )  # fmt: skip
    assert settings.smtp == SmtpConfig(HostPort("mail.example.com", 587), True, "bot", "s3cret")
    assert settings.sender == "fleet@example.com" and settings.state_path == tmp_path / "x.db"
    assert "s3cret" not in repr(settings), "the password never shows in a repr"


def test_environment_fallbacks() -> None:
    settings = build(
        [],
        {
            "HITLESS_SMTP": "smtp.example.com:2525",
            "HITLESS_SMTP_STARTTLS": "true",
            "HITLESS_SMTP_USER": "bot",
            "HITLESS_SMTP_PASSWORD": "pw",
            "HITLESS_SMTP_FROM": "n@example.com",
            "HITLESS_NOTIFIER_STATE": "/tmp/n.db",
        },
    )
    assert settings.smtp == SmtpConfig(HostPort("smtp.example.com", 2525), True, "bot", "pw")
    assert settings.sender == "n@example.com" and settings.state_path == Path("/tmp/n.db")


def test_the_controller_user_is_the_flag_else_the_environment_else_the_amqp_urls() -> None:
    assert build([]).controller_user == "guest", "the default URL logs in as guest"
    url = "amqp://hitless%2Dnotifier%40ops:pw@rabbit.example.com/fleet"
    assert build(["--amqp", url]).controller_user == "hitless-notifier@ops"
    assert build(["--amqp", "amqp://rabbit.example.com/fleet"]).controller_user == "guest"
    environ = {"HITLESS_CONTROLLER_USER": "hitless-controller"}
    assert build(["--amqp", url], environ).controller_user == "hitless-controller"
    flag = ["--controller-user", "ctl-2"]
    assert build(flag, environ).controller_user == "ctl-2"
    assert build(["--controller-user", "é" * 127]).controller_user == "é" * 127


def test_there_is_no_password_flag() -> None:
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["run", "--smtp-password", "pw"])


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["--smtp-user", "bot", "--smtp-starttls"], {}, "no password: put it in the environment"),
        ([], {"HITLESS_SMTP_PASSWORD": "pw"}, "no user: add --smtp-user"),
        (["--smtp", "mail.example.com:25", "--smtp-user", "bot"], {"HITLESS_SMTP_PASSWORD": "pw"},
         "without --smtp-starttls would send the password in clear"),
        (["--smtp", "mail.example.com"], {}, "invalid SMTP address"),
        (["--from", "not an address"], {}, "invalid sender address"),
        (["--from", "a@b.c\r\nBcc: x@y.z"], {}, "invalid sender address"),
        (["--from", "jörg@example.com"], {}, "invalid sender address .* bare ASCII address"),
        (["--controller-user", " guest"], {}, "invalid controller user .* no spaces"),
        (["--controller-user", "ctl\x1b[2J"], {}, "invalid controller user"),
        (["--controller-user", "é" * 128], {}, "invalid controller user .*1 to 255 bytes"),
        ([], {"HITLESS_CONTROLLER_USER": "ctl\u202e"}, "invalid controller user"),
    ],
)  # fmt: skip
def test_invalid_configuration_is_a_clear_config_error(
    argv: list[str], environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        build(argv, environ)


def test_cli_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--smtp-user", "bot", "--smtp-starttls"]) == cli.EXIT_USAGE
    assert "HITLESS_SMTP_PASSWORD" in capsys.readouterr().err


def test_login_on_loopback_may_skip_starttls() -> None:
    SmtpConfig(HostPort("127.0.0.1", 1025), user="bot", password="pw")
    SmtpConfig(HostPort("::1", 1025), user="bot", password="pw")


def test_ledger_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state" / "notifier.db"
    ledger = Ledger(path)
    assert ledger.begin("ev", "a@x.org", "<m1>") == 1
    assert ledger.begin("ev", "a@x.org", "<m1>") == 2, "a SENDING pair can be begun again"
    ledger.sent("ev", "a@x.org")
    ledger.begin("ev", "b@x.org", "<m2>")
    ledger.failed("ev", "c@x.org", "550 no such user")
    ledger.close()

    ledger = Ledger(path)
    try:
        assert ledger.states("ev") == {
            "a@x.org": State.SENT, "b@x.org": State.SENDING, "c@x.org": State.FAILED,
        }  # fmt: skip
        assert ledger.detail("ev", "c@x.org") == "550 no such user"
        assert ledger.states("other") == {}
    finally:
        ledger.close()


def test_a_login_that_may_not_declare_is_passive_by_flag_or_environment(tmp_path: Path) -> None:
    state = ["--state", str(tmp_path / "n.db")]
    assert not build(state).bus.passive
    assert build([*state, "--passive"]).bus.passive
    assert build(state, {"HITLESS_AMQP_PASSIVE": "1"}).bus.passive
    secret = tmp_path / "amqp.url"
    secret.write_text("amqp://notifier:pw@broker:5672/%2F\n")
    from_file = build(state, {"HITLESS_AMQP_URL_FILE": str(secret)}).bus
    assert from_file.user == "notifier" and from_file.url.endswith("/%2F")
