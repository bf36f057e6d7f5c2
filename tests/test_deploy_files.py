"""docker-compose.yml is valid Compose, and every service runs a command this code accepts."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from controller_svc.cli import _parser as controller_parser
from gateway_daemon.cli import _parser as gateway_parser
from notifier.cli import _parser as notifier_parser

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {
    "controller-svc": controller_parser,
    "gateway-daemon": gateway_parser,
    "notifier": notifier_parser,
}


def test_compose_file_matches_the_compose_spec() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "check-jsonschema"),
         "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_run_commands_the_code_accepts() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    commands = {
        name: service["command"]
        for name, service in compose["services"].items()
        if service.get("image") == "hitless:latest"
    }
    assert {"controller", "notifier", "gateway-1"} <= commands.keys()
    for name, argv in commands.items():
        assert argv[0] in scripts, f"{name} runs {argv[0]}, which is no console script"
        PARSERS[argv[0]]().parse_args(argv[1:])  # exits (SystemExit) on a bad flag
        for dependency in compose["services"][name].get("depends_on", {}):
            assert dependency in compose["services"], f"{name} depends on unknown {dependency}"
