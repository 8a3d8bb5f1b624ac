"""One error type for fedfsd, with the exit code a CLI uses and the reason that may cross a border.

Why one base: the region tells the aggregator why it refused a task, and that reason must never
carry a path, a row or a vehicle id. Deciding it from exception class *names* (as the ClientApp
once did) reported a bug's ``KeyError`` as "bad train request". Every fedfsd error now states its
own border-safe category and its exit code; anything that is not a :class:`FedfsdError` is an
internal error, named as such. The CLIs print and exit through :func:`exit_for`, so the same bad
input gives the same exit code from every command.
"""

from __future__ import annotations

import sys
from enum import IntEnum
from typing import ClassVar, NoReturn


class ExitCode(IntEnum):
    """Process exit codes shared by every fedfsd command (documented in docs/contracts.md)."""

    OK = 0
    FAILED = 1  # the work ran and failed (a run with failed rounds, a missed check)
    USAGE = 2  # bad input: flags, policy, dataset, settings (typer uses 2 for bad flags too)
    REFUSED = 3  # a privacy refusal: budget, egress guard, metric not allowed
    INTEGRITY = 4  # a signature, digest, chain or report did not verify
    ENVIRONMENT = 5  # the machine: disk full, port taken, a process that would not start


class FedfsdError(Exception):
    """Base of every error fedfsd raises on purpose.

    ``border_reason`` is a fixed category, safe to send to the aggregator; ``str(err)`` is the
    detailed message for the local operator and may name local paths.
    """

    exit_code: ClassVar[ExitCode] = ExitCode.FAILED
    border_reason: ClassVar[str] = "failed"

    def border_safe(self) -> str:
        """What may leave the region about this error (never the detailed message)."""
        return self.border_reason


class InputError(FedfsdError):
    """Bad input from the user: a flag, a policy, a dataset, a settings file."""

    exit_code = ExitCode.USAGE
    border_reason = "bad input"


class PrivacyRefusal(FedfsdError):
    """A privacy guard refused: the budget, the egress guard, a metric the policy does not allow."""

    exit_code = ExitCode.REFUSED
    border_reason = "refused by the region's privacy guard"


class IntegrityError(FedfsdError):
    """Something that must verify did not: a signature, a digest, a hash chain, a report."""

    exit_code = ExitCode.INTEGRITY
    border_reason = "integrity check failed"


class EnvironmentFault(FedfsdError):
    """The machine stopped the work: disk full, a port taken, a process that would not start."""

    exit_code = ExitCode.ENVIRONMENT
    border_reason = "region environment fault"


def border_reason(exc: BaseException) -> str:
    """The reason that may cross the border for any exception (internal errors say only that)."""
    if isinstance(exc, FedfsdError):
        return exc.border_safe()
    return "internal error"


def exit_code(exc: BaseException) -> int:
    """The exit code a CLI uses for ``exc`` (internal errors: 1)."""
    if isinstance(exc, FedfsdError):
        return int(exc.exit_code)
    return int(ExitCode.FAILED)


def exit_for(exc: BaseException | str, code: int | None = None) -> NoReturn:
    """Print ``error: …`` on stderr and exit with the error's code: the one way CLIs stop on errors.

    A plain string is a usage error unless ``code`` says otherwise.
    """
    import typer  # imported late: the ClientApp imports this module and never needs typer

    if isinstance(exc, str):
        message, status = exc, int(ExitCode.USAGE) if code is None else code
    else:
        message, status = str(exc) or type(exc).__name__, exit_code(exc) if code is None else code
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(status)
