"""The regional privacy ledger: an append-only, crash-safe JSON Lines file.

One ledger per region and fleet. The first line opens it (region, fleet, δ, budget, whether the
ledger is private); every release appends one line holding the mechanism parameters and the
cumulative accountant history *after* that release, so the last line alone reproduces ε.

Tamper evidence: every line starts with `"prev"`, the sha256 of the previous line's bytes (the
open record has `"prev": ""` and starts the chain), and ends with `"sig"`, the region's Ed25519
signature over the rest of the line (fedfsd.privacy.signing; the open record carries the public
key). Loading verifies both and names the first line that breaks them, so a deleted, reordered or
edited line is found. The head (hash of the last line) is what a release's manifest carries and
the aggregator keeps in its receipts. Ledgers written before the chain (no `"chain"` in the open
record) are *legacy*: readable (reports, `ledger show`) but never appended to.

Crash safety: every line is written with one `write`, flushed and fsync'd before the caller may
release anything; the directory is fsync'd when the file is created. A process killed during a
write leaves at most a torn last line (no trailing newline). Such a tail is dropped only when it
provably never left the region: it must be a prefix of the line this code would have written
(it starts with the current head), and no release marker (`<ledger>.releases/*.released`,
written once a release's line is durable and before the update is handed to Flower) may name a
release that is not on the ledger. Anything else (garbage without newline, lines cut after their
release was sent) is tampering or loss: `check_integrity` raises, naming the line and release,
and the region refuses to train.

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
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np

from fedfsd.durable import atomic_file
from fedfsd.durable import fsync_dir as _fsync_dir
from fedfsd.errors import InputError, IntegrityError
from fedfsd.privacy import signing
from fedfsd.privacy.accounting import AccountantError, History, normalise_history
from fedfsd.privacy.accounting_mixed import Spend
from fedfsd.privacy.distributed_accounting import (
    Assumption,
    SkellamHistory,
    SkellamRound,
    normalise_skellam_history,
)
from fedfsd.privacy.release_record import ReleaseRecord
from fedfsd.wire import array_digest

SCHEMA = 1
CHAIN = "sha256+ed25519"  # the open record's "chain": how lines are linked and signed
# Line kinds that spend privacy: each carries its (σ, q, steps) and the cumulative history after it.
SPENDING = ("release", "metric")
NORMALISATION = "sum of clipped vehicle gradients + noise, divided by expected vehicles per step"


class LedgerError(IntegrityError, RuntimeError):
    """A ledger that is corrupt, or that belongs to another region, fleet or mode."""

    border_reason = "privacy ledger refused the release"


class NoSuchLedger(InputError, LedgerError):
    """The ledger file does not exist: the operator named the wrong path (bad input, exit 2)."""

    border_reason = LedgerError.border_reason


# A hook called at each point of a release where a crash must be survivable. Production never
# installs one; tests/test_privacy_crash.py installs one that SIGKILLs the process there.
FaultHook = Callable[..., None]
_fault_hook: FaultHook | None = None


def set_fault_hook(hook: FaultHook | None) -> None:
    """Install `hook(point, **context)` (None removes it); for crash-safety tests only.

    Points: "train" (mid-training), "cache" (weights cached, spend not yet recorded),
    "record" (spend fsync'd, release not yet returned) and "ledger-line" (just before a ledger
    line is written; context `file` (the open ledger) and `line` (its bytes))."""
    global _fault_hook
    _fault_hook = hook


def fault_point(name: str, **context: Any) -> None:
    """A crash-safety point of a release: calls the installed hook, if any (no-op otherwise)."""
    if _fault_hook is not None:
        _fault_hook(name, **context)


def update_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays in name order (the same digest the update's manifest carries)."""
    return array_digest(arrays)


def line_hash(raw: bytes) -> str:
    """sha256 (hex) of one ledger line's bytes without its newline: the next line's `prev`."""
    return hashlib.sha256(raw).hexdigest()


_TORN_RUN = re.compile(r'"run_id": "((?:[^"\\]|\\.)*)"')
_TORN_ROUND = re.compile(r'"round": (\d+)[,}]')


def is_distributed(rec: dict[str, Any]) -> bool:
    """A release under the distributed trust model (issue 15): Skellam share, secure sum."""
    return rec.get("trust_model") == "distributed"


def distributed_entry(rec: dict[str, Any]) -> SkellamRound:
    """The one-round Skellam history entry a distributed release line states in its fields."""
    try:
        return SkellamRound(
            sample_rate=rec["sample_rate"],
            share_variance=rec["noise_share_variance"],
            min_honest_regions=rec["min_honest_regions"],
            scale=rec["quantisation_scale"],
            clip_norm=rec["clip_norm"],
            dimension=rec["dimension"],
            rounds=1,
        )
    except (KeyError, ValueError) as e:
        raise LedgerError(f"distributed release lacks a valid mechanism field: {e}") from None


def _skellam_history(raw: Any, path: Path, i: int) -> SkellamHistory:
    try:
        return normalise_skellam_history(raw or [])
    except (AccountantError, ValueError, TypeError) as e:
        raise LedgerError(f"{path}:{i}: invalid distributed_history: {e}") from None


def _safe(s: str) -> str:
    return (
        re.sub(r"[^A-Za-z0-9_.-]", "_", s)[:64] + "-" + hashlib.sha256(s.encode()).hexdigest()[:8]
    )


class Ledger:
    """Read and append one region's ledger file (see docs/contracts.md, "Ledger records")."""

    def __init__(self, path: str | Path, key_path: str | Path | None = None) -> None:
        self.path = Path(path)
        # The region's signing key; by default next to the ledger (created with the ledger).
        self.key_path = Path(key_path) if key_path else signing.ledger_key_path(self.path)
        self._torn_tail: str | None = None
        self._torn_bytes = 0
        self._records: list[dict[str, Any]] | None = None
        self._hashes: list[str] = []

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
            raise NoSuchLedger(f"{self.path}: no such ledger")
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        self._torn_tail = tail.decode("utf-8", "replace") if tail else None
        self._torn_bytes = len(tail)
        records: list[dict[str, Any]] = []
        hashes: list[str] = []
        prev: History = []
        prev_d: SkellamHistory = []
        pub = None
        for i, raw in enumerate(lines, start=1):
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LedgerError(f"{self.path}:{i}: corrupt record (not JSON)") from None
            # "personalised": a model trained in the region without DP, never released; it is
            # recorded so the egress guard can refuse it, and counts for no ε.
            if not isinstance(rec, dict) or rec.get("kind") not in (
                "open",
                *SPENDING,
                "personalised",
            ):
                raise LedgerError(f"{self.path}:{i}: not a ledger record")
            if (i == 1) != (rec["kind"] == "open"):
                raise LedgerError(f"{self.path}:{i}: the first line, and only it, must be 'open'")
            if rec.get("schema") != SCHEMA:
                raise LedgerError(f"{self.path}:{i}: unsupported schema {rec.get('schema')!r}")
            if rec["kind"] in SPENDING and rec.get("private", True):
                hist = normalise_history(rec["accountant_history"])
                if is_distributed(rec):
                    # A distributed release spends in the Skellam history, not the Gaussian one.
                    step_d = distributed_entry(rec)
                    dist = _skellam_history(rec.get("distributed_history"), self.path, i)
                    if hist != prev or dist != normalise_skellam_history([*prev_d, step_d]):
                        raise LedgerError(
                            f"{self.path}:{i}: distributed_history does not extend the previous "
                            "release by this release's round (or accountant_history changed)"
                        )
                    prev_d = dist
                else:
                    step = (rec["noise_multiplier"], rec["sample_rate"], rec["steps"])
                    if hist != normalise_history([*prev, step]):
                        raise LedgerError(
                            f"{self.path}:{i}: accountant_history does not extend the previous "
                            "release by this release's steps"
                        )
                    carried = rec.get("distributed_history")
                    if carried is not None and _skellam_history(carried, self.path, i) != prev_d:
                        raise LedgerError(
                            f"{self.path}:{i}: a Gaussian release may carry distributed_history "
                            "only unchanged"
                        )
                prev = hist
            if i == 1 and rec.get("chain") is not None:
                if rec["chain"] != CHAIN:
                    raise LedgerError(f"{self.path}:1: unknown chain {rec['chain']!r}")
                try:
                    pub = signing.parse_public_key(str(rec.get("public_key", "")))
                except signing.SigningKeyError:
                    raise LedgerError(f"{self.path}:1: no valid public_key") from None
            if pub is not None:
                self._check_link(i, rec, hashes[-1] if hashes else "", pub)
            hashes.append(line_hash(raw))
            records.append(rec)
        if not records:
            raise LedgerError(f"{self.path}: empty ledger (no 'open' record)")
        self._records = records
        self._hashes = hashes
        return records

    def _check_link(self, i: int, rec: dict[str, Any], prev_hash: str, pub: Any) -> None:
        """Line i must name the previous line's hash and carry the ledger key's signature."""
        if rec.get("prev") != prev_hash:
            what = "the chain start" if i == 1 else f"line {i - 1}"
            raise LedgerError(
                f"{self.path}:{i}: hash chain broken: line {i} does not follow {what} "
                "(a line was deleted, reordered, inserted or edited)"
            )
        body = {k: v for k, v in rec.items() if k != "sig"}
        if not isinstance(rec.get("sig"), str) or not signing.verify(pub, body, rec["sig"]):
            raise LedgerError(
                f"{self.path}:{i}: bad signature (line edited, or signed by another key than "
                "the ledger's public_key)"
            )

    @property
    def legacy(self) -> bool:
        """True for a ledger written before the hash chain (readable, never appended to)."""
        return self.header.get("chain") is None

    @property
    def public_key(self) -> str:
        """The ledger's Ed25519 public key (hex), or "" for a legacy ledger."""
        return str(self.header.get("public_key", ""))

    @property
    def ledger_id(self) -> str:
        """Hash of the open record: names this ledger (a second ledger has another id)."""
        self._load()
        return self._hashes[0]

    @property
    def head(self) -> str:
        """Hash of the last complete line (what the next line's `prev` must be)."""
        self._load()
        return self._hashes[-1]

    def line_of(self, run_id: str, round_idx: int) -> int | None:
        """1-based line number of the release (run_id, round), or None."""
        for i, r in enumerate(self._load(), start=1):
            if r["kind"] == "release" and r.get("run_id") == run_id:
                if int(r.get("round", -1)) == int(round_idx):
                    return i
        return None

    def release_proof(self, run_id: str, round_idx: int) -> dict[str, Any]:
        """Where the release (run_id, round) sits in the chain: ledger id, line number, hash."""
        i = self.line_of(run_id, round_idx)
        if i is None:
            raise LedgerError(f"{self.path}: run {run_id!r} round {round_idx} is not on the ledger")
        return {"ledger_id": self._hashes[0], "ledger_seq": i, "ledger_head": self._hashes[i - 1]}

    def line_hashes(self) -> list[str]:
        self._load()
        return list(self._hashes)

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

    def releases(self) -> list[ReleaseRecord]:
        return [cast(ReleaseRecord, r) for r in self._load() if r["kind"] == "release"]

    def history(self) -> History:
        """Cumulative (σ, q, steps) history after the last release (Opacus' form).

        Only for a ledger without distributed releases: on a mixed ledger the Gaussian history
        alone under-counts, so this refuses (LedgerError) and callers that project ε use
        `spend()` (both histories; fedfsd.privacy.accounting_mixed) instead."""
        if self.distributed_history():
            raise LedgerError(
                f"{self.path}: this ledger has distributed-noise releases; ε must compose them "
                "(Ledger.spend(), fedfsd.privacy.accounting_mixed), the Gaussian history alone "
                "under-counts"
            )
        return self.gaussian_history()

    def gaussian_history(self) -> History:
        """The Gaussian (DP-SGD and metric) part of the history, without distributed releases."""
        rel = [r for r in self._load() if r["kind"] in SPENDING and r.get("private", True)]
        return normalise_history(rel[-1]["accountant_history"]) if rel else []

    def distributed_history(self) -> SkellamHistory:
        """Cumulative Skellam history of the distributed releases (empty if there are none)."""
        rel = [r for r in self._load() if r["kind"] in SPENDING and is_distributed(r)]
        return normalise_skellam_history(rel[-1]["distributed_history"]) if rel else []

    def spend(self) -> Spend:
        """Both histories: every release a vehicle of this fleet took part in, local or
        distributed (the input of every ε projection on this ledger)."""
        return Spend(self.gaussian_history(), self.distributed_history())

    def enforce_on(self) -> Assumption:
        """The assumption the budget was last enforced on: the last spending line that names one
        (a distributed release, or a local one on a mixed ledger); "own_noise" if none does."""
        named = [r for r in self._load() if r["kind"] in SPENDING and r.get("enforce_on")]
        return "distributed" if named and named[-1]["enforce_on"] == "distributed" else "own_noise"

    def epsilon(
        self,
        delta: float | None = None,
        accountant: str = "prv",
        assumption: Assumption | None = None,
    ) -> float:
        """ε spent so far at `delta` (default: the ledger's own δ); ∞ for a non-private ledger.

        Without distributed releases: `accountant`'s ε of the Gaussian history (PRV headline).
        With them: the RDP composition of every release under `assumption` (default: the one the
        budget is enforced on; PRV cannot account Skellam, `accountant` is then ignored)."""
        if not self.private:
            return math.inf
        d = delta or float(self.header["delta"])
        return self.spend().epsilon(d, assumption or self.enforce_on(), accountant)

    def epsilons(self, delta: float | None = None) -> dict[str, float]:
        """ε under both assumptions of distributed noise (RDP when the ledger is mixed)."""
        if not self.private:
            return {"distributed": math.inf, "own_noise": math.inf}
        return self.spend().epsilons(delta or float(self.header["delta"]))

    def metric_releases(self) -> list[dict[str, Any]]:
        """Differentially private metric releases (kind "metric"), in ledger order."""
        return [r for r in self._load() if r["kind"] == "metric"]

    def find_release(self, run_id: str, round_idx: int) -> ReleaseRecord | None:
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
        key = signing.load_or_create_key(self.key_path)
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
            "chain": CHAIN,
            "public_key": signing.public_hex(key.public_key()),
            "nonce": secrets.token_hex(16),  # two ledgers never share an id (open-line hash)
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            raise LedgerError(f"{self.path}: ledger already exists") from None
        try:
            os.write(fd, self._line(rec, "", key) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.path.parent)
        self._records = None

    @staticmethod
    def _line(record: dict[str, Any], prev: str, key: Any) -> bytes:
        """One chained, signed line (no newline): `prev` first, `sig` last."""
        body = {"prev": prev, **{k: v for k, v in record.items() if k not in ("prev", "sig")}}
        body["sig"] = signing.sign(key, body)
        return json.dumps(body, allow_nan=False).encode()

    def signing_key(self) -> Any:
        """The region's private key for this ledger; refuses one that is not the ledger's key."""
        try:
            key = signing.load_private_key(self.key_path)
        except signing.SigningKeyError as e:
            raise LedgerError(f"{self.path}: {e}") from None
        if signing.public_hex(key.public_key()) != self.public_key:
            raise LedgerError(
                f"{self.path}: signing key {self.key_path} is not this ledger's key "
                f"(open record public_key {self.public_key[:16]}…)"
            )
        return key

    def append(self, record: dict[str, Any]) -> str:
        """Append one chained, signed record durably (single write, flush, fsync).

        A torn tail is cut first, but only after `check_integrity` showed it never left.
        Returns the new head (the hash of the appended line).
        """
        self._load()
        if self.legacy:
            raise LedgerError(
                f"{self.path}: legacy ledger without a hash chain; it stays readable for "
                "reports but is never appended to (archive it, start a new ledger; "
                "docs/privacy-report.md)"
            )
        self.check_integrity()
        key = self.signing_key()
        raw = self._line(record, self.head, key)
        line = raw + b"\n"
        with open(self.path, "r+b") as f:
            if self._torn_tail is not None:
                size = f.seek(0, os.SEEK_END)
                f.truncate(size - self._torn_bytes)
                f.flush()
                os.fsync(f.fileno())
                self._torn_tail = None
            f.seek(0, os.SEEK_END)
            fault_point("ledger-line", file=f, line=line)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._records = None
        return line_hash(raw)

    # ---- integrity: crash or tampering? --------------------------------------------------

    def _torn_names(self) -> tuple[str | None, int | None]:
        t = self._torn_tail or ""
        run, rnd = _TORN_RUN.search(t), _TORN_ROUND.search(t)
        run_id = json.loads(f'"{run.group(1)}"') if run else None
        return run_id, int(rnd.group(1)) if rnd else None

    def check_integrity(self) -> None:
        """Refuse (LedgerError naming line and release) when the ledger lost a sent release.

        A torn tail passes only as the prefix of a line this code would write next; every
        release marker must name a release that is on the ledger, on the line it was sent from.
        """
        records = self._load()
        n = len(records)
        if self._torn_tail is not None and not self.legacy:
            expect = '{"prev": "' + self.head + '", '
            t = self._torn_tail
            if not (t.startswith(expect) or expect.startswith(t)):
                raise LedgerError(
                    f"{self.path}:{n + 1}: {len(t)} bytes without a newline that are not a torn "
                    "write of the next line (garbage or an edited tail): tampering; refusing to "
                    "train until the ledger is restored"
                )
        hashes = self._hashes
        for m in self.release_markers():
            run_id, rnd = str(m.get("run_id")), int(m.get("round", -1))
            line = self.line_of(run_id, rnd)
            if line is None:
                where = ""
                if self._torn_tail is not None:
                    t_run, t_rnd = self._torn_names()
                    torn = "" if (t_run, t_rnd) == (run_id, rnd) else " (another release)"
                    where = f"; line {n + 1} is torn{torn}"
                raise LedgerError(
                    f"{self.path}: release of run {run_id!r} round {rnd} was released (marker "
                    f"{m['_file']}) but is not on the ledger (was line {m.get('ledger_seq')}"
                    f"{where}): lines were cut or lost after they were sent; refusing to train"
                )
            if m.get("ledger_head") and hashes[line - 1] != m["ledger_head"]:
                raise LedgerError(
                    f"{self.path}:{line}: release of run {run_id!r} round {rnd} differs from the "
                    "line that was released (edited or rewritten); refusing to train"
                )

    def release_markers(self) -> list[dict[str, Any]]:
        """Every `*.released` marker next to the ledger (each names one sent release)."""
        out: list[dict[str, Any]] = []
        if not self.cache_dir.is_dir():
            return out
        for p in sorted(self.cache_dir.glob("*.released")):
            try:
                m = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                raise LedgerError(f"{p}: unreadable release marker") from None
            m["_file"] = p.name
            out.append(m)
        return out

    def mark_released(self, run_id: str, round_idx: int) -> Path:
        """Record durably that this release's line is complete and it may now leave."""
        proof = self.release_proof(run_id, round_idx)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        final = self.cache_dir / f"{_safe(run_id)}-r{int(round_idx)}.released"
        tmp = final.with_name(final.name + ".tmp")
        data = json.dumps({"run_id": run_id, "round": int(round_idx), **proof}).encode()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.cache_dir)
        return final

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
            np.savez(f, allow_pickle=False, **{f"w:{k}": v for k, v in weights.items()})
        return final

    def read_cache(self, run_id: str, round_idx: int) -> dict[str, np.ndarray] | None:
        p = self.cache_path(run_id, round_idx)
        if not p.exists():
            return None
        with np.load(p) as z:
            return {k[2:]: z[k] for k in z.files if k.startswith("w:")}
