"""The region's side of a secure-aggregation round: a state machine, one method per stage.

Each method takes the aggregator's message (bytes) and returns the reply (bytes). A refused
message raises SecAggRefused and changes nothing; a stage advances only on success, so a replayed
or out-of-stage message is refused, and a region answers each stage exactly once (in particular
it never reveals both secrets of one peer: the rule that protects a region that was only late).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgpack
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedfsd.secagg import keys, masks, messages, shamir
from fedfsd.secagg.errors import SecAggRefused
from fedfsd.secagg.params import RoundParams
from fedfsd.secagg.quantize import to_ring

STAGES = ("setup", "keys", "routed", "unmask", "done")


@dataclass(frozen=True)
class Advertisement:
    """A region's signed per-round public keys and self-mask seed commitment."""

    region: str
    share_pk: bytes
    mask_pk: bytes
    commitment: bytes
    signature: bytes

    def body(self) -> dict[str, bytes | str]:
        return {
            "region": self.region,
            "share_pk": self.share_pk,
            "mask_pk": self.mask_pk,
            "commitment": self.commitment,
            "signature": self.signature,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, object]) -> Advertisement:
        f = messages.field
        return cls(
            region=f(body, "region", str),
            share_pk=f(body, "share_pk", bytes),
            mask_pk=f(body, "mask_pk", bytes),
            commitment=f(body, "commitment", bytes),
            signature=f(body, "signature", bytes),
        )

    def verify(self, params: RoundParams, long_term: Ed25519PublicKey) -> None:
        """SecAggRefused unless the region's long-term key signed these keys for this round."""
        stmt = keys.advertisement_statement(
            params.tag, self.region, self.share_pk, self.mask_pk, self.commitment
        )
        keys.check_signature(long_term, stmt, self.signature, f"advertisement of {self.region}")
        for raw in (self.share_pk, self.mask_pk):
            keys.x25519_public(raw)  # refuses anything but a 32-byte X25519 key


class RegionSession:
    """One region in one round. `peer_keys` maps every participant to its long-term Ed25519 key
    (obtained out of band, as for manifests); `accept(params)` may raise to refuse a setup the
    region's policy does not allow (its own run id, round, vector length, minimum threshold)."""

    def __init__(
        self,
        region: str,
        signing_key: Ed25519PrivateKey,
        peer_keys: Mapping[str, Ed25519PublicKey],
        *,
        accept: Callable[[RoundParams], None] | None = None,
    ) -> None:
        self.region = region
        self._signing_key = signing_key
        self._peer_keys = dict(peer_keys)
        self._accept = accept
        self.stage = "setup"
        self.params: RoundParams | None = None
        self._keys: keys.RoundKeys | None = None
        self._ads: dict[str, Advertisement] = {}
        self._held: dict[str, tuple[bytes, bytes, bytes, bytes]] = {}  # owner -> shares + sigs
        self.peers_masked_with: list[str] = []

    # -- persistence between Flower messages
    def export_state(self) -> bytes:
        """This session as bytes, secrets included, to keep between messages of one round.

        Why: a ClientApp may run each message in a fresh process. The bytes hold this round's
        X25519 secret keys, self-mask seed and the shares dealt to this region: keep them only
        inside the region (memory, or a 0600 file) and drop them when the round ends.
        """
        k = self._keys
        state = {
            "v": messages.VERSION,
            "region": self.region,
            "stage": self.stage,
            "params": self.params.body() if self.params else None,
            "keys": None
            if k is None
            else [keys.raw_private(k.share_sk), keys.raw_private(k.mask_sk), k.self_seed],
            "ads": {r: a.body() for r, a in self._ads.items()},
            "held": {r: list(v) for r, v in self._held.items()},
            "peers": self.peers_masked_with,
        }
        return msgpack.packb(state, use_bin_type=True)

    @classmethod
    def restore(
        cls,
        blob: bytes,
        signing_key: Ed25519PrivateKey,
        peer_keys: Mapping[str, Ed25519PublicKey],
        *,
        accept: Callable[[RoundParams], None] | None = None,
    ) -> RegionSession:
        """A session from `export_state` bytes (the region's own, trusted storage)."""
        try:
            st = msgpack.unpackb(blob, raw=False)
            if st.get("v") != messages.VERSION or st["stage"] not in STAGES:
                raise ValueError("version or stage")
            s = cls(st["region"], signing_key, peer_keys, accept=accept)
            s.stage = st["stage"]
            s.params = RoundParams.from_body(st["params"]) if st["params"] else None
            if st["keys"] is not None:
                share, mask, seed = st["keys"]
                s._keys = keys.RoundKeys(
                    X25519PrivateKey.from_private_bytes(share),
                    X25519PrivateKey.from_private_bytes(mask),
                    seed,
                )
            s._ads = {r: Advertisement.from_body(a) for r, a in st["ads"].items()}
            s._held = {r: (v[0], v[1], v[2], v[3]) for r, v in st["held"].items()}
            s.peers_masked_with = list(st["peers"])
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            raise SecAggRefused(f"secagg: unusable saved region state ({e})") from None
        return s

    def _expect(self, stage: str) -> RoundParams:
        if self.stage != stage:
            raise SecAggRefused(f"{self.region}: a {stage!r} message in stage {self.stage!r}")
        assert self.params is not None or stage == "setup"
        return self.params  # type: ignore[return-value]

    # -- stage 0: setup -> advertise
    def on_setup(self, data: bytes) -> bytes:
        """Check the round's parameters, make this round's keys, reply with the signed advert."""
        self._expect("setup")
        params = RoundParams.from_body(messages.decode(data, "setup"))
        if self.region not in params.participants:
            raise SecAggRefused(f"{self.region}: not a participant of this round")
        missing = [p for p in params.participants if p not in self._peer_keys]
        if missing:
            raise SecAggRefused(f"{self.region}: no long-term key for participants {missing}")
        if self._accept is not None:
            self._accept(params)
        k = keys.RoundKeys()
        share_pk, mask_pk = keys.raw_public(k.share_sk), keys.raw_public(k.mask_sk)
        commit = keys.seed_commitment(params.tag, self.region, k.self_seed)
        stmt = keys.advertisement_statement(params.tag, self.region, share_pk, mask_pk, commit)
        ad = Advertisement(self.region, share_pk, mask_pk, commit, self._signing_key.sign(stmt))
        self.params, self._keys, self._ads = params, k, {self.region: ad}
        self.stage = "keys"
        return messages.encode("advertise", ad.body())

    # -- stage 1: keys -> shares
    def on_keys(self, data: bytes) -> bytes:
        """Verify every advertisement, deal Shamir shares of both secrets, encrypt one per peer."""
        params = self._expect("keys")
        assert self._keys is not None
        body = messages.decode(data, "keys")
        raw = messages.field(body, "advertisements", list)
        ads: dict[str, Advertisement] = {}
        for item in raw:
            if not isinstance(item, dict):
                raise SecAggRefused("keys: malformed advertisement")
            ad = Advertisement.from_body(item)
            if ad.region not in params.participants or ad.region in ads:
                raise SecAggRefused(f"keys: advertisement of {ad.region!r} not allowed here")
            ad.verify(params, self._peer_keys[ad.region])
            ads[ad.region] = ad
        if ads.get(self.region) != self._ads[self.region]:
            raise SecAggRefused(f"{self.region}: its own advertisement was altered or left out")
        if len(ads) < params.threshold:
            raise SecAggRefused(f"keys: {len(ads)} advertisements, threshold {params.threshold}")
        n = len(params.participants)
        seed_sh = shamir.split(self._keys.self_seed, params.threshold, n)
        key_sh = shamir.split(keys.raw_private(self._keys.mask_sk), params.threshold, n)
        cts: dict[str, bytes] = {}
        for peer in sorted(ads):
            i = params.index(peer)
            s_sig = self._signing_key.sign(
                keys.share_statement(params.tag, "seed", self.region, peer, seed_sh[i])
            )
            k_sig = self._signing_key.sign(
                keys.share_statement(params.tag, "mask-key", self.region, peer, key_sh[i])
            )
            if peer == self.region:
                self._held[peer] = (seed_sh[i], s_sig, key_sh[i], k_sig)
                continue
            plain = msgpack.packb(
                [self.region, peer, seed_sh[i], s_sig, key_sh[i], k_sig], use_bin_type=True
            )
            ck = keys.channel_key(
                self._keys.share_sk, ads[peer].share_pk, params.tag, self.region, peer
            )
            cts[peer] = keys.encrypt(ck, plain, keys.share_aad(params.tag, self.region, peer))
        self._ads = ads
        self.stage = "routed"
        return messages.encode("shares", {"region": self.region, "ciphertexts": cts})

    # -- stage 2: routed shares (+ the region's integer vector) -> masked input
    def on_routed(
        self,
        data: bytes,
        vector: np.ndarray,
        attach: Callable[[bytes], bytes] | None = None,
    ) -> bytes:
        """Decrypt and check the shares dealt to this region, then mask `vector` and reply.

        `vector`: the region's integers (quantised update plus its noise share), length d.
        `attach(masked vector bytes)` returns opaque bytes sent with them under "manifest" (the
        region's signed bound check, which names the digest of exactly those bytes).
        """
        params = self._expect("routed")
        assert self._keys is not None
        body = messages.decode(data, "routed")
        if messages.field(body, "recipient", str) != self.region:
            raise SecAggRefused(f"{self.region}: routed shares addressed to another region")
        cts = messages.bytes_map(body, "ciphertexts")
        held = {self.region: self._held[self.region]}
        for sender, ct in cts.items():
            if sender not in self._ads or sender == self.region:
                raise SecAggRefused(f"routed: a share from {sender!r}, who did not advertise")
            ck = keys.channel_key(
                self._keys.share_sk, self._ads[sender].share_pk, params.tag, self.region, sender
            )
            aad = keys.share_aad(params.tag, sender, self.region)
            plain = keys.decrypt(ck, ct, aad, f"share from {sender}")
            held[sender] = self._check_plain(params, sender, plain)
        if len(held) < params.threshold:
            raise SecAggRefused(
                f"routed: shares from {len(held)} regions, threshold {params.threshold}"
            )
        z = np.asarray(vector)
        if z.ndim != 1 or z.shape[0] != params.dim or not np.issubdtype(z.dtype, np.integer):
            raise SecAggRefused(f"{self.region}: the input must be {params.dim} integers")
        b = params.bit_width
        y = masks.ring_add(to_ring(z, b), masks.prg(self._keys.self_seed, params.dim, b), b)
        peers = sorted(p for p in held if p != self.region)
        for peer in peers:
            seed = masks.pairwise_seed(
                self._keys.mask_sk, self._ads[peer].mask_pk, params.tag, self.region, peer
            )
            y = masks.ring_add(
                y, masks.prg(seed, params.dim, b), b, masks.pair_sign(self.region, peer)
            )
        self._held, self.peers_masked_with = held, peers
        self.stage = "unmask"
        payload = y.astype(params.wire_dtype).tobytes()
        out: dict[str, bytes | str] = {"region": self.region, "vector": payload}
        if attach is not None:
            out["manifest"] = attach(payload)
        return messages.encode("masked", out)

    def _check_plain(
        self, params: RoundParams, sender: str, plain: bytes
    ) -> tuple[bytes, bytes, bytes, bytes]:
        try:
            owner, holder, s_sh, s_sig, k_sh, k_sig = msgpack.unpackb(plain, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException):
            raise SecAggRefused(f"share from {sender}: malformed") from None
        if owner != sender or holder != self.region:
            raise SecAggRefused(f"share from {sender}: names {owner!r} -> {holder!r}")
        pk = self._peer_keys[sender]
        for kind, sh, sig in (("seed", s_sh, s_sig), ("mask-key", k_sh, k_sig)):
            stmt = keys.share_statement(params.tag, kind, sender, self.region, sh)
            keys.check_signature(pk, stmt, sig, f"{kind} share from {sender}")
        return s_sh, s_sig, k_sh, k_sig

    # -- stage 3: unmask request -> the asked shares
    def on_unmask(self, data: bytes) -> bytes:
        """Reveal seed shares of survivors and mask-key shares of dropped regions, never both."""
        params = self._expect("unmask")
        body = messages.decode(data, "unmask-request")
        survivors = set(messages.str_list(body, "survivors"))
        dropped = set(messages.str_list(body, "dropped"))
        both = survivors & dropped
        if both:
            raise SecAggRefused(
                f"{self.region}: asked for both the self mask and the mask key of {sorted(both)}"
            )
        unknown = (survivors | dropped) - set(self._held)
        if unknown:
            raise SecAggRefused(
                f"{self.region}: asked about regions it holds no share of: {sorted(unknown)}"
            )
        if self.region not in survivors:
            raise SecAggRefused(f"{self.region}: the request does not list it as a survivor")
        if len(survivors) < params.threshold:
            raise SecAggRefused(
                f"{self.region}: {len(survivors)} survivors, threshold {params.threshold}"
            )
        reply = {
            "region": self.region,
            "seed_shares": {u: self._held[u][0] for u in sorted(survivors)},
            "seed_sigs": {u: self._held[u][1] for u in sorted(survivors)},
            "key_shares": {v: self._held[v][2] for v in sorted(dropped)},
            "key_sigs": {v: self._held[v][3] for v in sorted(dropped)},
        }
        self.stage = "done"
        self._keys = None  # this round's secrets are no longer needed
        return messages.encode("unmask", reply)
