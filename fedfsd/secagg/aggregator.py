"""The aggregator's side of a secure-aggregation round: it relays, sums and unmasks the sum.

It never holds an individual region's unmasked vector: masked inputs are added into one running
sum as they arrive (a masked input alone is uniformly random in Z_{2^b}), and unmasking removes
self masks and dropped regions' pairwise masks from that sum only. `held_state()` returns
everything the object holds, so a test (or an auditor) can check that claim; `observer` is
called after every change of state.

`admit` (optional) sees each masked input and what came attached to it (the region's signed
bound check) before the input touches the sum: an excluded input is dropped as if the region had
not sent it, so the survivors' shares remove its pairwise masks like any dropout's.

Stage closers (`keys_message`, `routed_messages`, `unmask_request`, `result`) end a stage: a
message for a closed stage is refused as out of stage. Fewer than t regions at any closer aborts
the round: the running sum is discarded and nothing is unmasked.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedfsd.secagg import keys, masks, messages, shamir
from fedfsd.secagg.errors import SecAggAbort, SecAggRefused
from fedfsd.secagg.params import PROTOCOL, RoundParams
from fedfsd.secagg.quantize import ring_mask
from fedfsd.secagg.region import Advertisement

# admit(region, masked vector bytes, attached manifest bytes or None) -> None to use the input,
# or the reason to exclude it (checked before the input is added to the running sum).
Admit = Callable[[str, bytes, bytes | None], str | None]


def _snapshot(obj: Any) -> Any:
    """A copy of `obj` with long-term public keys as raw bytes (key objects do not copy)."""
    if isinstance(obj, Ed25519PublicKey):
        return obj.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_snapshot(v) for v in obj]
    return copy.deepcopy(obj)


class AggregatorSession:
    """One round at the aggregator. `region_keys`: participant -> long-term Ed25519 key."""

    def __init__(
        self,
        params: RoundParams,
        region_keys: Mapping[str, Ed25519PublicKey],
        *,
        observer: Callable[[str], None] | None = None,
        admit: Admit | None = None,
    ) -> None:
        missing = [p for p in params.participants if p not in region_keys]
        if missing:
            raise SecAggRefused(f"secagg: no long-term key for participants {missing}")
        self.params = params
        self._region_keys = {p: region_keys[p] for p in params.participants}
        self._observer = observer
        self._admit = admit
        self.stage = "advertise"
        self._ads: dict[str, Advertisement] = {}
        self._cts: dict[str, dict[str, bytes]] = {}  # sender -> recipient -> ciphertext
        self._shared: list[str] = []  # U2
        self._masked: list[str] = []  # U3
        self._excluded: list[str] = []  # sent masked input that `admit` refused
        self._sum: np.ndarray | None = None
        self._unmask: dict[str, dict[str, dict[str, bytes]]] = {}  # responder -> shares
        self._result: np.ndarray | None = None
        self._refused: list[dict[str, str]] = []
        self._abort: str | None = None
        self._responders: list[str] = []  # who answered the unmask request

    # -- helpers
    def _changed(self, event: str) -> None:
        if self._observer is not None:
            self._observer(event)

    def _refuse(self, region: str, stage: str, reason: str) -> SecAggRefused:
        self._refused.append({"region": region, "stage": stage, "reason": reason})
        return SecAggRefused(f"{stage} from {region!r}: {reason}")

    def _open(self, stage: str, data: bytes, kind: str) -> tuple[str, dict[str, Any]]:
        """Decode, and refuse a message of a closed stage or from a non-participant."""
        try:
            body = messages.decode(data, kind)
            region = messages.field(body, "region", str)
        except SecAggRefused as e:
            raise self._refuse("?", stage, str(e)) from None
        if region not in self.params.participants:
            raise self._refuse(region, stage, "not a participant of this round")
        if self.stage != stage:
            raise self._refuse(region, stage, f"out of stage (the round is at {self.stage!r})")
        return region, body

    def _abort_round(self, reason: str) -> SecAggAbort:
        self._abort, self.stage = reason, "aborted"
        self._sum = None  # nothing can be unmasked any more
        self._unmask.clear()
        self._cts.clear()
        self._changed("aborted")
        return SecAggAbort(f"secure aggregation aborted: {reason}")

    def _need(self, have: list[str], what: str) -> None:
        if len(have) < self.params.threshold:
            raise self._abort_round(
                f"{len(have)} regions {what}, fewer than the threshold {self.params.threshold}"
            )

    # -- stage 0: setup
    def setup_message(self) -> bytes:
        """The setup message, the same for every participant."""
        return messages.encode("setup", self.params.body())

    def receive_advertisement(self, data: bytes) -> None:
        region, body = self._open("advertise", data, "advertise")
        if region in self._ads:
            raise self._refuse(region, "advertise", "duplicate (replayed) message")
        try:
            ad = Advertisement.from_body(body)
            ad.verify(self.params, self._region_keys[region])
        except SecAggRefused as e:
            raise self._refuse(region, "advertise", str(e)) from None
        self._ads[region] = ad
        self._changed("advertise")

    # -- stage 1: keys
    def keys_message(self) -> bytes:
        """Close advertising; the message every advertiser gets (all signed advertisements)."""
        self._close("advertise", "shares")
        self._need(list(self._ads), "advertised keys")
        ads = [self._ads[r].body() for r in sorted(self._ads)]
        return messages.encode("keys", {"advertisements": ads})

    def _close(self, stage: str, following: str) -> None:
        if self.stage != stage:
            raise SecAggRefused(f"secagg: cannot close {stage!r} in stage {self.stage!r}")
        self.stage = following

    def receive_shares(self, data: bytes) -> None:
        region, body = self._open("shares", data, "shares")
        if region in self._cts:
            raise self._refuse(region, "shares", "duplicate (replayed) message")
        if region not in self._ads:
            raise self._refuse(region, "shares", "did not advertise keys")
        try:
            cts = messages.bytes_map(body, "ciphertexts")
        except SecAggRefused as e:
            raise self._refuse(region, "shares", str(e)) from None
        if set(cts) != set(self._ads) - {region}:
            raise self._refuse(region, "shares", "must hold one ciphertext per other advertiser")
        self._cts[region] = cts
        self._shared.append(region)
        self._changed("shares")

    # -- stage 2: routed shares
    def routed_messages(self) -> dict[str, bytes]:
        """Close share collection; per region of U2, the ciphertexts addressed to it."""
        self._close("shares", "masked")
        self._need(self._shared, "sent shares")
        out = {}
        for v in sorted(self._shared):
            cts = {u: self._cts[u][v] for u in sorted(self._shared) if u != v}
            out[v] = messages.encode("routed", {"recipient": v, "ciphertexts": cts})
        self._cts.clear()  # relayed: nothing left to hold
        self._changed("routed")
        return out

    def receive_masked_input(self, data: bytes) -> None:
        region, body = self._open("masked", data, "masked")
        if region in self._masked or region in self._excluded:
            raise self._refuse(region, "masked", "duplicate (replayed) message")
        if region not in self._shared:
            raise self._refuse(region, "masked", "did not take part in the share exchange")
        p = self.params
        raw = body.get("vector")
        size = np.dtype(p.wire_dtype).itemsize * p.dim
        if not isinstance(raw, bytes) or len(raw) != size:
            raise self._refuse(region, "masked", f"the vector must be {size} bytes")
        y = np.frombuffer(raw, dtype=p.wire_dtype).astype(np.uint64)
        if np.any(y > ring_mask(p.bit_width)):
            raise self._refuse(region, "masked", "an element outside the ring")
        if self._admit is not None:  # before the input touches the sum
            attached = body.get("manifest")
            why = self._admit(region, raw, attached if isinstance(attached, bytes) else None)
            if why is not None:  # excluded: the region counts as dropped before masking
                self._excluded.append(region)
                raise self._refuse(region, "masked", why)
        self._sum = y.copy() if self._sum is None else masks.ring_add(self._sum, y, p.bit_width)
        del y, raw  # only the running sum stays
        self._masked.append(region)
        self._changed("masked")

    # -- stage 3: unmask
    def _dropped(self) -> list[str]:
        return sorted(set(self._shared) - set(self._masked))

    def unmask_request(self) -> bytes:
        """Close masked input; the request every survivor gets (abort below the threshold)."""
        self._close("masked", "unmask")
        self._need(self._masked, "sent masked input")
        body = {"survivors": sorted(self._masked), "dropped": self._dropped()}
        self._changed("unmask-request")
        return messages.encode("unmask-request", body)

    def receive_unmask(self, data: bytes) -> None:
        region, body = self._open("unmask", data, "unmask")
        if region in self._unmask:
            raise self._refuse(region, "unmask", "duplicate (replayed) message")
        if region not in self._masked:
            raise self._refuse(region, "unmask", "not a survivor")
        try:
            seed = messages.bytes_map(body, "seed_shares")
            seed_sig = messages.bytes_map(body, "seed_sigs")
            key = messages.bytes_map(body, "key_shares")
            key_sig = messages.bytes_map(body, "key_sigs")
            if set(seed) != set(self._masked) or set(seed_sig) != set(seed):
                raise SecAggRefused("seed shares must cover exactly the survivors")
            if set(key) != set(self._dropped()) or set(key_sig) != set(key):
                raise SecAggRefused("mask-key shares must cover exactly the dropped regions")
            for kind, shares, sigs in (("seed", seed, seed_sig), ("mask-key", key, key_sig)):
                for owner, share in shares.items():
                    stmt = keys.share_statement(self.params.tag, kind, owner, region, share)
                    keys.check_signature(
                        self._region_keys[owner], stmt, sigs[owner], f"{kind} share of {owner}"
                    )
        except SecAggRefused as e:
            raise self._refuse(region, "unmask", str(e)) from None
        self._unmask[region] = {"seed": seed, "mask-key": key}
        self._changed("unmask")

    def _combine(self, kind: str, owner: str) -> bytes:
        p = self.params
        shares = {p.index(h): got[kind][owner] for h, got in self._unmask.items()}
        return shamir.combine(shares, p.threshold)

    def result(self) -> np.ndarray:
        """Close unmasking and return the sum of the survivors' vectors in Z_{2^b} (uint64)."""
        self._close("unmask", "unmasking")
        self._need(list(self._unmask), "answered the unmask request")
        self._responders = sorted(self._unmask)
        p, b = self.params, self.params.bit_width
        assert self._sum is not None
        acc = self._sum
        for u in sorted(self._masked):
            seed = self._combine("seed", u)
            if keys.seed_commitment(p.tag, u, seed) != self._ads[u].commitment:
                raise self._abort_round(
                    f"the shares of {u}'s self mask do not match its commitment"
                )
            acc = masks.ring_add(acc, masks.prg(seed, p.dim, b), b, -1)
            self._sum = acc
            self._changed(f"removed self mask of {u}")
        for v in self._dropped():
            raw = self._combine("mask-key", v)
            sk = X25519PrivateKey.from_private_bytes(raw)
            if keys.raw_public(sk) != self._ads[v].mask_pk:
                raise self._abort_round(f"the shares of {v}'s mask key do not match its advert")
            for u in sorted(self._masked):
                seed = masks.pairwise_seed(sk, self._ads[u].mask_pk, p.tag, v, u)
                mask = masks.prg(seed, p.dim, b)
                acc = masks.ring_add(acc, mask, b, -masks.pair_sign(u, v))
            self._sum = acc
            self._changed(f"removed pairwise masks of dropped {v}")
        self._result, self._sum = acc, None
        self._unmask.clear()
        self.stage = "completed"
        self._changed("completed")
        return acc.copy()

    # -- inspection
    def held_state(self) -> dict[str, Any]:
        """A deep copy of everything this object holds (tests walk it for individual vectors)."""
        return {k: _snapshot(v) for k, v in vars(self).items() if k not in ("_observer", "_admit")}

    def transcript(self) -> dict[str, Any]:
        """Who did what this round, for the aggregator's run directory (JSON-serialisable)."""
        p = self.params
        done = self.stage == "completed"
        responders = self._responders or sorted(self._unmask)
        return {
            "protocol": PROTOCOL,
            "run_id": p.run_id,
            "round": p.round,
            "participants": list(p.participants),
            "threshold": p.threshold,
            "bit_width": p.bit_width,
            "dim": p.dim,
            "params_sha256": p.tag.hex(),
            "advertised": sorted(self._ads),
            "shared_keys": sorted(self._shared),
            "masked_input": sorted(self._masked),
            "dropped_before_masking": self._dropped() if self._shared else [],
            "excluded_at_masking": sorted(self._excluded),
            "unmask_responders": responders,
            # sent masked input, then went silent: its self mask came from the others' shares
            "recovered_after_masking": sorted(set(self._masked) - set(responders)) if done else [],
            "summed": sorted(self._masked) if done else [],
            "refused": list(self._refused),
            "status": self.stage if self.stage in ("completed", "aborted") else "running",
            "abort_reason": self._abort,
        }
