"""Errors of the operator's CLI, and the exit code each one ends the process with.

    hitless.errors.HitlessError
    ├── hitless.errors.ConfigError  bad flag or value (e.g. a version)       → USAGE
    └── CliError                    root of this package                     → INTERNAL
        ├── UsageError              the command line asks for the impossible → USAGE
        │                           (a missing file; a key directory that is
        │                           missing, already there, or holds other
        │                           keys than the controller's root names)
        ├── Unreachable             the controller cannot be reached         → UNREACHABLE
        ├── Unconfirmed             StartUpgrade (RotateRoot, CreateToken)   → UNCONFIRMED
        │                           went unanswered: the job (root, token)
        │                           may exist; the message says how to look
        │                           and how to retry with the same request id
        ├── Rejected                the controller refused the request, or   → REJECTED
        │   │                       the plan shows it would (not found,
        │   │                       invalid, conflict, precondition such as
        │   │                       a release without signed targets, a
        │   │                       downgrade without --allow-downgrade, a
        │   │                       yank of a release no signed targets list)
        │   └── CredentialsRefused  the controller refused the API token:    → REJECTED
        │                           none, unknown, expired or revoked
        │                           (UNAUTHENTICATED), or its role may not
        │                           do this (PERMISSION_DENIED)
        ├── NeedsConfirmation       the upgrade disconnects VPN users, or a  → NEEDS_CONFIRMATION
        │                           yank, and with no terminal to ask on nor
        │                           --yes nobody agreed to that
        ├── Declined                the operator did not answer yes          → DECLINED
        ├── ControllerFailed        the controller failed unexpectedly       → INTERNAL
        ├── BuildError              a release artifact could not be built    → INTERNAL
        └── JobNotSucceeded         a watched job ended without every        → JOB_NOT_SUCCEEDED
                                    gateway succeeding

Every message is meant for the operator as is: it says what failed, on what, and what to
do next. ``cli.main`` prints it after ``upgradectl: error:`` and exits with the code.
Errors of the signing library (``hitless.trust.errors``) become these in
``upgradectl.signing``, keeping the library's message.
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
    NEEDS_CONFIRMATION = 6
    DECLINED = 7
    # The upgrade (root rotation, token) may exist: look, or retry as the message says.
    UNCONFIRMED = 8
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


class Unconfirmed(CliError):
    """StartUpgrade was sent and its answer never came (or was an unexpected failure).

    The controller may have started the job all the same, so this is not ``Unreachable``:
    running the same command again would start a second job. Retrying with the same
    request id is safe: the controller answers it with the job it started, if any.
    RotateRoot and CreateToken end the same way: the root may be taken, the token may
    exist (its secret then lost with the answer).
    """

    exit_code = ExitCode.UNCONFIRMED


class Rejected(CliError):
    """The controller answered and refused; the message is the controller's own sentence."""

    exit_code = ExitCode.REJECTED


class CredentialsRefused(Rejected):
    """The controller refused the caller's API token (UNAUTHENTICATED) or its role
    (PERMISSION_DENIED); the message carries the controller's details as they came."""


class CredentialsMissing(CliError):
    """A credential the call needs was not given (the CA certificate that checks the
    controller); nothing was sent."""

    exit_code = ExitCode.REJECTED


class NeedsConfirmation(CliError):
    """The upgrade (or yank) needs the operator's yes, and it could neither be asked nor
    was given."""

    exit_code = ExitCode.NEEDS_CONFIRMATION


class Declined(CliError):
    """The operator was asked to confirm an upgrade (or yank) and did not say yes."""

    exit_code = ExitCode.DECLINED


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
