"""The regional privacy ledger: an append-only, crash-safe JSON Lines file.

One ledger per region and fleet. The first line opens it (region, fleet, δ, budget, whether the
ledger is private); every release appends one line holding the mechanism parameters and the
cumulative accountant history *after* that release, so the last line alone reproduces ε.

Crash safety: every line is written with one `write`, flushed and fsync'd before the caller may
release anything; the directory is fsync'd when the file is created. A process killed during a
write leaves at most a torn last line (no trailing newline); loading tolerates it, reports it in
`torn_tail`, and does not count it (the release it describes never left: release happens only
after the fsync returned). The next append first cuts that torn fragment off.

Released weights are cached next to the ledger (`<ledger>.releases/`) so that a repeated
(run_id, round) returns the same release without new spend.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.durable import atomic_file
from fedfsd.durable import fsync_dir as _fsync_dir
from fedfsd.privacy.accounting import History, compute_epsilon, normalise_history
from fedfsd.wire import array_digest

SCHEMA = 1
NORMALISATION = "sum of clipped vehicle gradients + noise, divided by expected vehicles per step"


class LedgerError(RuntimeError):
    """A ledger that is corrupt, or that belongs to another region, fleet or mode."""


def fault_point(name: str) -> None:
    """Test-only crash injection: SIGKILL this process at `name` if FEDFSD_FAULT_AT says so."""
    if os.environ.get("FEDFSD_FAULT_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def update_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays in name order (the same digest the update's manifest carries)."""
    return array_digest(arrays)


def _safe(s: str) -> str:
    return (
        re.sub(r"[^A-Za-z0-9_.-]", "_", s)[:64] + "-" + hashlib.sha256(s.encode()).hexdigest()[:8]
    )


class Ledger:
    """Read and append one region's ledger file (see docs/contracts.md, "Ledger records")."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._torn_tail: str | None = None
        self._torn_bytes = 0
        self._records: list[dict[str, Any]] | None = None

    # ---- reading -------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.path.exists()

    def is_unopened(self) -> bool:
        """True for a file whose open record never completed (crash during `create`)."""
        return self.path.exists() and b"\n" not in self.path.read_bytes()

    def _load(self) -> list[dict[str, Any]]:
        if self._records is not None:
            return self._records
        if not self.path.exists():
            raise LedgerError(f"{self.path}: no such ledger")
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        self._torn_tail = tail.decode("utf-8", "replace") if tail else None
        self._torn_bytes = len(tail)
        records: list[dict[str, Any]] = []
        prev: History = []
        for i, raw in enumerate(lines, start=1):
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LedgerError(f"{self.path}:{i}: corrupt record (not JSON)") from None
            if not isinstance(rec, dict) or rec.get("kind") not in ("open", "release"):
                raise LedgerError(f"{self.path}:{i}: not a ledger record")
            if (i == 1) != (rec["kind"] == "open"):
                raise LedgerError(f"{self.path}:{i}: the first line, and only it, must be 'open'")
            if rec.get("schema") != SCHEMA:
                raise LedgerError(f"{self.path}:{i}: unsupported schema {rec.get('schema')!r}")
            if rec["kind"] == "release" and rec.get("private", True):
                hist = normalise_history(rec["accountant_history"])
                step = (rec["noise_multiplier"], rec["sample_rate"], rec["steps"])
                if hist != normalise_history([*prev, step]):
                    raise LedgerError(
                        f"{self.path}:{i}: accountant_history does not extend the previous "
                        "release by this release's steps"
                    )
                prev = hist
            records.append(rec)
        if not records:
            raise LedgerError(f"{self.path}: empty ledger (no 'open' record)")
        self._records = records
        return records

    @property
    def torn_tail(self) -> str | None:
        """The torn last line left by a crash mid-write (not counted), or None."""
        self._load()
        return self._torn_tail

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, the open record first (a torn last line is not included)."""
        return list(self._load())

    @property
    def header(self) -> dict[str, Any]:
        return self._load()[0]

    @property
    def private(self) -> bool:
        return bool(self.header.get("private", True))

    def releases(self) -> list[dict[str, Any]]:
        return [r for r in self._load() if r["kind"] == "release"]

    def history(self) -> History:
        """Cumulative (σ, q, steps) history after the last release (Opacus' form)."""
        rel = [r for r in self.releases() if r.get("private", True)]
        return normalise_history(rel[-1]["accountant_history"]) if rel else []

    def epsilon(self, delta: float | None = None, accountant: str = "prv") -> float:
        """ε spent so far at `delta` (default: the ledger's own δ); ∞ for a non-private ledger."""
        if not self.private:
            return math.inf
        return compute_epsilon(self.history(), delta or float(self.header["delta"]), accountant)

    def find_release(self, run_id: str, round_idx: int) -> dict[str, Any] | None:
        for r in self.releases():
            if r["run_id"] == run_id and int(r["round"]) == int(round_idx):
                return r
        return None

    def check_matches(self, *, region: str, fleet_id: str, private: bool, delta: float) -> None:
        """Refuse to mix regions, fleets, private and non-private runs, or δs in one ledger."""
        h = self.header
        if h["region"] != region:
            raise LedgerError(
                f"{self.path}: ledger is for region {h['region']!r}, data is {region!r}"
            )
        if h["fleet_id"] != fleet_id:
            raise LedgerError(
                f"{self.path}: ledger is for fleet {h['fleet_id']!r}, data is fleet {fleet_id!r} "
                "(one ledger per region and fleet)"
            )
        if self.private != private:
            kind = "private" if self.private else "NON-PRIVATE"
            raise LedgerError(f"{self.path}: this is a {kind} ledger; never mix the two")
        if private and float(h["delta"]) != float(delta):
            raise LedgerError(
                f"{self.path}: ledger δ is {h['delta']:g} but the policy says {delta:g}; "
                "ε is only comparable at one δ (start a new ledger for a new fleet)"
            )

    # ---- writing -------------------------------------------------------------------------

    def create(
        self,
        *,
        region: str,
        fleet_id: str,
        vehicles: int,
        delta: float,
        epsilon_budget: float,
        private: bool,
        created: str,
    ) -> None:
        """Write the open record to a new file (refuses to overwrite) and fsync file and dir."""
        rec = {
            "kind": "open",
            "schema": SCHEMA,
            "region": region,
            "fleet_id": fleet_id,
            "vehicles": vehicles,
            "delta": delta,
            "epsilon_budget": epsilon_budget,
            "private": private,
            "created": created,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            raise LedgerError(f"{self.path}: ledger already exists") from None
        try:
            os.write(fd, (json.dumps(rec) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.path.parent)
        self._records = None

    def append(self, record: dict[str, Any]) -> None:
        """Append one record durably (single write, flush, fsync) after cutting a torn tail."""
        self._load()
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        with open(self.path, "r+b") as f:
            if self._torn_tail is not None:
                size = f.seek(0, os.SEEK_END)
                f.truncate(size - self._torn_bytes)
                f.flush()
                os.fsync(f.fileno())
                self._torn_tail = None
            f.seek(0, os.SEEK_END)
            if os.environ.get("FEDFSD_FAULT_AT") == "ledger-torn":  # test-only: half a line
                f.write(line[: len(line) // 2])
                f.flush()
                os.fsync(f.fileno())
                fault_point("ledger-torn")
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._records = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock for a whole round (check → train → record) across processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lf:
            fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
            try:
                self._records = None
                yield
            finally:
                fcntl.flock(lf.fileno(), fcntl.LOCK_UN)

    # ---- release cache -------------------------------------------------------------------

    @property
    def cache_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".releases")

    def cache_path(self, run_id: str, round_idx: int) -> Path:
        return self.cache_dir / f"{_safe(run_id)}-r{int(round_idx)}.npz"

    def write_cache(self, run_id: str, round_idx: int, weights: dict[str, np.ndarray]) -> Path:
        """Atomically store the weights a release returns (tmp file, fsync, rename, fsync dir)."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        final = self.cache_path(run_id, round_idx)
        with atomic_file(final) as f:  # disk full: one line naming the file, no .tmp left
            np.savez(f, **{f"w:{k}": v for k, v in weights.items()})
        return final

    def read_cache(self, run_id: str, round_idx: int) -> dict[str, np.ndarray] | None:
        p = self.cache_path(run_id, round_idx)
        if not p.exists():
            return None
        with np.load(p) as z:
            return {k[2:]: z[k] for k in z.files if k.startswith("w:")}
