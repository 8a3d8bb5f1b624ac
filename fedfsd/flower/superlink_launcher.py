"""`flower-superlink` whose SuperExec is fedfsd's (fedfsd.flower.serverexec), with its settings.

Why: the SuperLink starts its own SuperExec (`flower-superexec`, found on PATH) to run
ServerApps; there is no flag to start another. This launcher replaces that command by
`python -P -m fedfsd.flower.serverexec` with the same arguments, takes two options of its own
before handing the rest to `flower-superlink`, and puts them in the environment the SuperExec
inherits:

  --fedfsd-serverapp-digests D1,D2   the ServerApp bundles allowed to run (sha256)
  --fedfsd-security-log PATH         where refusals are logged (fedfsd.audit): refused
                                     bundles (by the SuperExec) and refused SuperNode keys
                                     (fedfsd.flower.node_refusals, in this process)

flwr 1.39 internals (`flower_superlink._get_superexec_command`); flwr is pinned `<1.40`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from fedfsd.flower.serverexec import ENV_DIGESTS, ENV_SECURITY_LOG

OPTIONS = {"--fedfsd-serverapp-digests": ENV_DIGESTS, "--fedfsd-security-log": ENV_SECURITY_LOG}


def take_options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(argv without this launcher's options, the environment they set)."""
    rest: list[str] = []
    env: dict[str, str] = {}
    it = iter(argv)
    for arg in it:
        if arg in OPTIONS:
            env[OPTIONS[arg]] = next(it, "")
        else:
            rest.append(arg)
    return rest, env


def wrap_command(original: Callable[..., list[str]]) -> Callable[..., list[str]]:
    """`_get_superexec_command` that starts fedfsd's SuperExec instead of `flower-superexec`."""

    def command(*args: Any, **kwargs: Any) -> list[str]:
        cmd = list(original(*args, **kwargs))
        if cmd and cmd[0] == "flower-superexec":
            cmd = [sys.executable, "-P", "-m", "fedfsd.flower.serverexec", *cmd[1:]]
        return cmd

    return command


def main() -> None:
    """Strip and apply this launcher's options, patch the SuperExec command, run the SuperLink."""
    argv, env = take_options(sys.argv[1:])
    os.environ.update(env)
    import importlib

    # The package re-exports the function under the module's name: fetch the module itself.
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    fs._get_superexec_command = wrap_command(fs._get_superexec_command)  # type: ignore[attr-defined]  # noqa: SLF001
    if log := env.get(ENV_SECURITY_LOG):
        from fedfsd.flower.node_refusals import install

        install(log)
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *argv]
    flower_superlink()


if __name__ == "__main__":
    main()
