"""Refused SuperNode activations, written to the aggregator's security log (flwr 1.39 internals).

Why: a SuperNode whose key the aggregator never registered (or unregistered) is refused by the
SuperLink's Fleet API, and until now that showed only as one line of Flower's superlink.log.
fedfsd's SuperLink launcher (fedfsd.flower.superlink_launcher) wraps the Fleet API's
`message_handler.activate_node` in the SuperLink process: a refusal (no node for this public
key) is appended to the fedfsd security log (fedfsd.audit) as `node_refused`, with the key's
OpenSSH SHA256 fingerprint (what `ssh-keygen -lf KEY.pub` prints) and, when the key was once
registered with `fedfsd aggregator register`, the region name it was registered under (read
from KEY_NAMES next to the security log). The refusal itself is Flower's, unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

KEY_NAMES = "key_names.json"  # OpenSSH SHA256 fingerprint -> region name, next to the log
REPEAT_SECONDS = 30.0  # one event per key per this many seconds (a SuperNode may retry)


def fingerprint(public_key: Any) -> str:
    """`SHA256:...` of a public key object, as `ssh-keygen -l` prints it."""
    blob = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def fingerprint_of_file(path: str | Path) -> str:
    """Fingerprint of an OpenSSH public key file (a region's KEY.pub)."""
    return fingerprint(serialization.load_ssh_public_key(Path(path).read_bytes()))


def fingerprint_of_wire(key_bytes: bytes) -> str:
    """Fingerprint of a key as a SuperNode sends it (PEM SubjectPublicKeyInfo)."""
    try:
        return fingerprint(serialization.load_pem_public_key(key_bytes))
    except ValueError:
        return "sha256-of-bytes:" + hashlib.sha256(key_bytes).hexdigest()


def remember_key(root: str | Path, public_key_file: str | Path, name: str) -> str:
    """Record `name` for a registered key's fingerprint in ROOT/KEY_NAMES; the fingerprint."""
    path = Path(root) / KEY_NAMES
    names = known_names(path)
    fp = fingerprint_of_file(public_key_file)
    names[fp] = name
    path.write_text(json.dumps(names, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return fp


def known_names(path: str | Path) -> dict[str, str]:
    """fingerprint -> region name (empty when nothing was registered through fedfsd)."""
    try:
        return {str(k): str(v) for k, v in json.loads(Path(path).read_text("utf-8")).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def wrap_activate(original: Callable[..., Any], security_log: Path) -> Callable[..., Any]:
    """`activate_node` that logs a refusal for an unknown key, then lets it propagate."""
    last: dict[str, float] = {}

    def activate_node(request: Any, state: Any) -> Any:
        try:
            return original(request=request, state=state)
        except ValueError as err:
            if state.get_node_id_by_public_key(request.public_key) is None:
                fp = fingerprint_of_wire(bytes(request.public_key))
                now = time.monotonic()
                if now - last.get(fp, -REPEAT_SECONDS) >= REPEAT_SECONDS:
                    last[fp] = now
                    _log_refusal(security_log, fp, str(err))
            raise

    return activate_node


def _log_refusal(security_log: Path, fp: str, why: str) -> None:
    from fedfsd.audit import log_event

    region = known_names(security_log.parent / KEY_NAMES).get(fp)
    fields: dict[str, Any] = {"fingerprint": fp, "reason": f"key not registered: {why}"}
    if region is not None:
        fields["region"] = region
    try:
        log_event(security_log, "aggregator", "node_refused", **fields)
    except OSError as err:  # never let the audit log take the Fleet API down
        print(f"fedfsd: could not log a refused node: {err!r}", file=sys.stderr, flush=True)


def install(security_log: str | Path) -> None:
    """Patch the Fleet API's activation handler in this (the SuperLink's) process."""
    from flwr.server.superlink.fleet.message_handler import message_handler as mh

    mh.activate_node = wrap_activate(mh.activate_node, Path(security_log))
