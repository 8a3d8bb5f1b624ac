"""The aggregator's SuperExec with a ServerApp allow-list (flwr 1.39 internals).

Why: a stock SuperLink runs the ServerApp of any bundle pushed with `flwr run` to its Control
API; a foreign ServerApp pushed from the aggregator host ran there (only the regions refused its
ClientApp). As regions do for ClientApps, the aggregator now runs only bundles whose sha256 its
own configuration allows: this is `flower-superexec` with its exec plugin's `launch_task`
refusing any task whose bundle digest (`Task.fab_hash`, sha256 of the FAB, the digest
`fedfsd.deploy.appbundle.app_digest` prints) is not allowed. A refused task is finished at once
as failed with the reason (so `flwr ls` shows the run `finished:failed`), and written to the
fedfsd security log. Nothing of the refused bundle is installed or imported.

Configured by the environment, which the SuperLink passes on to the SuperExec it starts
(fedfsd.flower.superlink_launcher sets it): FEDFSD_SERVERAPP_DIGESTS (comma-separated; unset
means no check) and FEDFSD_SECURITY_LOG (path of the security log).
"""

from __future__ import annotations

import os
import sys
from typing import Any

ENV_DIGESTS = "FEDFSD_SERVERAPP_DIGESTS"
ENV_SECURITY_LOG = "FEDFSD_SECURITY_LOG"


def allowed_digests() -> frozenset[str] | None:
    """The allowed ServerApp bundle digests, or None when no allow-list is configured."""
    raw = os.environ.get(ENV_DIGESTS)
    if raw is None:
        return None
    return frozenset(d.strip().lower() for d in raw.split(",") if d.strip())


def refusal(digest: str, allowed: frozenset[str] | None) -> str | None:
    """Why a bundle digest may not run here, or None when it may."""
    if allowed is None or digest.lower() in allowed:
        return None
    return (
        f"fedfsd aggregator refused app bundle sha256={digest or '(none)'}: not in the "
        "aggregator's allowed ServerApp digests (fedfsd aggregator start --allow-serverapp)"
    )


def _finish_failed(plugin: Any, token: str, reason: str) -> None:
    """End the refused task now as failed (else it waits for Flower's task expiry)."""
    from flwr.common.constant import SubStatus
    from flwr.proto.runtime_pb2 import PushTaskOutputRequest  # pylint: disable=E0611
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    client = RuntimeHttpClient.from_server_address(
        server_address=plugin.runtime_api_address,
        insecure=plugin.insecure,
        root_certificates=validate_and_resolve_root_certificates(
            plugin.root_certificates_path, plugin.insecure
        ),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-serverapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    try:
        client.PushTaskOutput(PushTaskOutputRequest(sub_status=SubStatus.FAILED, details=reason))
    finally:
        client.close()


def make_plugin_class(base: type) -> type:
    """`base` (flwr's exec plugin) with launch_task refusing bundles not on the allow-list."""

    class AllowListExecPlugin(base):
        def launch_task(self, token: str, task: Any) -> Any:
            from flwr.supercore.superexec.executor import LaunchResult

            digest = task.fab_hash if task.HasField("fab_hash") else ""
            reason = refusal(digest, allowed_digests())
            if reason is None:
                return super().launch_task(token, task)
            if log_path := os.environ.get(ENV_SECURITY_LOG):
                from fedfsd.audit import log_event

                log_event(
                    log_path,
                    "aggregator",
                    "serverapp_refused",
                    flower_run_id=task.run_id,
                    fab_digest=digest,
                    reason=reason,
                )
            print(f"fedfsd: {reason} (run {task.run_id})", file=sys.stderr, flush=True)
            try:
                _finish_failed(self, token, reason)
            except Exception as err:  # the task then expires the stock way
                print(f"fedfsd: could not finish the refused task: {err!r}", file=sys.stderr)
            return LaunchResult.failed(reason)

    return AllowListExecPlugin


def main() -> None:
    """Install the allow-list plugin, then hand over to flwr's `flower-superexec`."""
    import flwr.supercore.superexec.run_superexec as rs

    rs.AutoExecPlugin = make_plugin_class(rs.AutoExecPlugin)  # type: ignore[misc, assignment]
    from flwr.supercore.cli import flower_superexec

    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
