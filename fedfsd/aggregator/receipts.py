"""The aggregator's receipts: signature and ledger-head checks, and a record of what it accepted.

A region's manifest is signed with its Ed25519 ledger key and names the line of its hash-chained
ledger that recorded the release (ledger id, line number, line hash). Here the aggregator

- checks the signature against the key registered for that region (`region-keys`); without a
  registry it pins the first key each region presents for the run (trust on first use) and
  refuses unsigned manifests unless `allow-unsigned` is set (development only);
- refuses a manifest whose ledger head does not extend the last one it saw from that region:
  another ledger id (a second ledger restarts ε at 0), an earlier or equal line (a rollback), or
  a lower ε; the very same release again (a resumed round) is accepted;
- secure rounds (fedfsd.aggregator.secure_round) use the same checks for the manifest that
  travels with each masked input, and record a receipt only for a region whose masked input
  went into an applied sum;
- appends every accepted manifest to `receipts.jsonl` and keeps the last heads in
  `ledger_heads.json` in the run directory, both fsync'd, so a resume keeps them.

A reviewer later holds the receipts against the region's ledger (`fedfsd privacy verify
--ledger --receipts`). Only the standard library, `cryptography` (via fedfsd.privacy.signing)
and the wire schema are imported: never the data or training code.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedfsd.durable import fsync_dir
from fedfsd.privacy import signing
from fedfsd.wire import UpdateManifest

RECEIPTS_JSONL = "receipts.jsonl"
LEDGER_HEADS = "ledger_heads.json"
LOG = logging.getLogger("flwr.fedfsd.aggregator")


def manifest_dict(m: UpdateManifest) -> dict[str, Any]:
    """Every manifest field by its proto name, defaults included (the receipt's JSON form).

    A non-finite float (ε of a non-private release) is written as its repr ("inf"), the same
    form the signature covers (fedfsd.privacy.signing.canonical).
    """
    out = {}
    for f in m.DESCRIPTOR.fields:
        v = getattr(m, f.name)
        out[f.name] = repr(v) if isinstance(v, float) and not math.isfinite(v) else v
    return out


def read_receipts(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every receipt of a run directory, oldest first ([] when there is none)."""
    p = Path(run_dir) / RECEIPTS_JSONL
    if not p.exists():
        return []
    out = []
    for i, line in enumerate(p.read_text().splitlines(), start=1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{p}:{i}: corrupt receipt") from None
    return out


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ReceiptBook:
    """Per-run signature and ledger-head state of every region (see module doc)."""

    def __init__(
        self,
        run_dir: str | Path | None,
        keys: Mapping[str, Any] | None = None,
        *,
        allow_unsigned: bool = False,
    ) -> None:
        """`run_dir` None: check only, keep heads in memory and write no receipt (tests)."""
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.keys = dict(keys or {})
        self.allow_unsigned = allow_unsigned
        p = None if self.run_dir is None else self.run_dir / LEDGER_HEADS
        self.heads: dict[str, dict[str, Any]] = (
            json.loads(p.read_text()) if p is not None and p.exists() else {}
        )

    @classmethod
    def from_settings(cls, run_dir: Path, region_keys: str, allow_unsigned: bool) -> ReceiptBook:
        keys = signing.load_region_keys(region_keys) if region_keys else {}
        if not keys:
            LOG.warning(
                "no region-keys configured: pinning each region's first signing key for this "
                "run (trust on first use)%s",
                "; UNSIGNED manifests accepted (allow-unsigned)" if allow_unsigned else "",
            )
        return cls(run_dir, keys, allow_unsigned=allow_unsigned)

    # ---- checks --------------------------------------------------------------------------

    def _key_for(self, region: str, m: UpdateManifest) -> tuple[Any, str] | str:
        """(public key, where it came from), or a rejection reason."""
        if self.keys:
            if region not in self.keys:
                return f"no registered signing key for region {region!r}"
            return self.keys[region], "registered"
        pinned = self.heads.get(region, {}).get("public_key")
        if pinned:
            return signing.parse_public_key(pinned), "first use"
        try:
            return signing.parse_public_key(m.public_key), "first use"
        except signing.SigningKeyError:
            return "manifest carries no valid public key"

    def check(self, m: UpdateManifest) -> str | None:
        """None to accept, or why the manifest is refused (signature or ledger head)."""
        region = m.region
        if not m.signature:
            if self.keys or not self.allow_unsigned:
                why = "region keys are configured" if self.keys else "set allow-unsigned for dev"
                return f"unsigned manifest ({why})"
            return None
        got = self._key_for(region, m)
        if isinstance(got, str):
            return got
        key, _ = got
        if not signing.verify(key, signing.manifest_payload(m), m.signature):
            return f"bad signature: manifest not signed by the key registered for {region!r}"
        return self._check_head(region, m)

    def _check_head(self, region: str, m: UpdateManifest) -> str | None:
        last = self.heads.get(region)
        if not m.ledger_id or not m.ledger_head or m.ledger_seq < 2:
            return "signed manifest names no ledger line (ledger_id/seq/head)"
        if last is None:
            return None
        if m.ledger_id != last["ledger_id"]:
            return (
                f"second ledger: ledger id {m.ledger_id[:12]}… is not the ledger "
                f"{last['ledger_id'][:12]}… seen from {region!r} in round {last['round']}"
            )
        same = (m.ledger_seq, m.ledger_head, m.run_id, m.round) == (
            last["ledger_seq"],
            last["ledger_head"],
            last["run_id"],
            last["round"],
        )
        if same:
            return None  # the same release again (a resumed round): no new spend
        if m.ledger_seq <= last["ledger_seq"]:
            return (
                f"ledger rollback: line {m.ledger_seq} does not extend line {last['ledger_seq']} "
                f"seen from {region!r} in round {last['round']}"
            )
        if math.isfinite(m.epsilon) and m.epsilon + 1e-12 < float(last.get("epsilon", 0.0)):
            return f"ledger rollback: ε {m.epsilon:.6g} < {last['epsilon']:.6g} seen before"
        return None

    # ---- records -------------------------------------------------------------------------

    def record(self, m: UpdateManifest, rnd: int) -> None:
        """Append an accepted manifest to receipts.jsonl and move the region's head."""
        key_hex, source = "", "unsigned"
        if m.signature:
            got = self._key_for(m.region, m)
            assert not isinstance(got, str)
            key_hex, source = signing.public_hex(got[0]), got[1]
        receipt = {
            "round": int(rnd),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "region": m.region,
            "public_key": key_hex,
            "key_source": source,
            "manifest": manifest_dict(m),
        }
        line = json.dumps(receipt, sort_keys=True, allow_nan=False)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / RECEIPTS_JSONL, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        if m.signature:
            self.heads[m.region] = {
                "ledger_id": m.ledger_id,
                "ledger_seq": int(m.ledger_seq),
                "ledger_head": m.ledger_head,
                "run_id": m.run_id,
                "round": int(m.round),
                "epsilon": m.epsilon if math.isfinite(m.epsilon) else None,
                "public_key": key_hex,
            }
            if self.run_dir is not None:
                _atomic_json(self.run_dir / LEDGER_HEADS, self.heads)

    def drop_after(self, last_round: int) -> None:
        """On resume: drop receipts of rounds after the checkpoint (they are received again).

        The ledger heads stay: the regions did record those releases.
        """
        if self.run_dir is None:
            return
        p = self.run_dir / RECEIPTS_JSONL
        if not p.exists():
            return
        keep = [r for r in read_receipts(self.run_dir) if int(r["round"]) <= last_round]
        tmp = p.with_name(f".{p.name}.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        fsync_dir(p.parent)
