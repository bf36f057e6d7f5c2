"""Errors of the operator's CLI, and the exit code each one ends the process with.

    hitless.errors.HitlessError
    ├── hitless.errors.ConfigError   bad flag or value (e.g. a version)      → USAGE
    └── CliError                     root of this package                    → INTERNAL
        ├── UsageError               the command line asks for the impossible → USAGE
        ├── Unreachable              the controller cannot be reached         → UNREACHABLE
        ├── Rejected                 the controller refused the request       → REJECTED
        │                            (not found, invalid, conflict, precondition)
        ├── ControllerFailed         the controller failed in an unexpected way → INTERNAL
        ├── BuildError               a release artifact could not be built   → INTERNAL
        └── JobNotSucceeded          a watched job ended without every gateway
                                     succeeding                              → JOB_NOT_SUCCEEDED

Every message is meant for the operator as is: it says what failed, on what, and what to
do next. ``cli.main`` prints it after ``upgradectl: error:`` and exits with the code.
"""

from __future__ import annotations

import enum

from hitless.errors import ConfigError, HitlessError


class ExitCode(enum.IntEnum):
    """The process exit codes of ``upgradectl``; scripts may rely on them."""

    OK = 0
    JOB_NOT_SUCCEEDED = 1
    USAGE = 2
    UNREACHABLE = 3
    REJECTED = 4
    INTERNAL = 5
    INTERRUPTED = 130  # the shell's convention for a process stopped by Ctrl-C


class CliError(HitlessError):
    """Base of every error ``upgradectl`` raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(CliError):
    """The command line is well formed but cannot be carried out (e.g. a missing file)."""

    exit_code = ExitCode.USAGE


class Unreachable(CliError):
    """The controller did not answer (connection refused, unavailable, deadline passed)."""

    exit_code = ExitCode.UNREACHABLE


class Rejected(CliError):
    """The controller answered and refused; the message is the controller's own sentence."""

    exit_code = ExitCode.REJECTED


class ControllerFailed(CliError):
    """The controller answered with an error that is neither a refusal nor unavailability."""

    exit_code = ExitCode.INTERNAL


class BuildError(CliError):
    """A release artifact could not be built from the running code."""

    exit_code = ExitCode.INTERNAL


class JobNotSucceeded(CliError):
    """A job the operator waited for ended with at least one gateway not SUCCEEDED."""

    exit_code = ExitCode.JOB_NOT_SUCCEEDED


def exit_code_for(exc: HitlessError) -> ExitCode:
    """The exit code for any hitless error: bad configuration is a usage error."""
    if isinstance(exc, CliError):
        return exc.exit_code
    if isinstance(exc, ConfigError):
        return ExitCode.USAGE
    return ExitCode.INTERNAL
