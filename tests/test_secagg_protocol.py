"""Secure aggregation (fedfsd/secagg) on the MLP's real update shape, four regions.

Every test drives the real state machines message by message (bytes in, bytes out) with real
X25519/Ed25519/AES keys; attacks are made by altering the bytes the aggregator relays.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedfsd.data.feature_spec import N_FEATURES, N_LABELS
from fedfsd.models import build_model
from fedfsd.secagg import (
    AggregatorSession,
    Quantizer,
    RegionSession,
    RoundParams,
    SecAggAbort,
    SecAggConfigError,
    SecAggRefused,
    choose_bit_width,
    from_ring,
    masks,
    shamir,
    sum_bound,
    to_ring,
)
from fedfsd.secagg import keys as sk
from fedfsd.secagg.quantize import ring_mask

pytestmark = pytest.mark.secagg

NAMES = ("cn", "eu", "jp", "us")
CLIP = 1.0  # per-vehicle clip norm C
CAP = 64  # sampled vehicles per step the regions cap at: |x_r|∞ <= CAP·C
SCALE = 2.0**12  # s: s·C = 4096 against sqrt(d) ≈ 282


def _mlp_dim() -> int:
    model = build_model("mlp", N_FEATURES, N_LABELS)
    return int(sum(int(np.prod(t.shape)) for t in model.state_dict().values()))


DIM = _mlp_dim()


def _region_updates(n: int, seed: int) -> list[np.ndarray]:
    """Per-region sums of clipped per-vehicle gradients, flattened from the MLP's shapes."""
    rng = np.random.default_rng(seed)
    model = build_model("mlp", N_FEATURES, N_LABELS)
    out = []
    for _ in range(n):
        total = np.zeros(DIM)
        for _v in range(8):  # eight sampled vehicles, each clipped to C in L2
            g = np.concatenate(
                [rng.normal(size=t.shape).ravel() for t in model.state_dict().values()]
            )
            total += g * min(1.0, CLIP / np.linalg.norm(g))
        out.append(total)
    return out


@pytest.fixture(scope="module")
def fleet() -> dict[str, Any]:
    lt = {n: Ed25519PrivateKey.generate() for n in NAMES}
    quant = Quantizer.fitted(scale=SCALE, linf_bound=CAP * CLIP, n_regions=len(NAMES))
    xs = dict(zip(NAMES, _region_updates(len(NAMES), seed=7), strict=True))
    zs = {n: quant.encode(x) for n, x in xs.items()}
    return {
        "lt": lt,
        "pub": {n: k.public_key() for n, k in lt.items()},
        "q": quant,
        "x": xs,
        "z": zs,
    }


def _params(fleet: dict[str, Any], names: Sequence[str] = NAMES, t: int = 3, rnd: int = 5):
    return RoundParams("run-1", rnd, tuple(names), t, fleet["q"].bit_width, DIM)


class Round:
    """One round driven stage by stage, so a test can stop or alter it anywhere."""

    def __init__(self, fleet: dict[str, Any], params: RoundParams, observer=None) -> None:
        self.f, self.p = fleet, params
        self.agg = AggregatorSession(params, fleet["pub"], observer=observer)
        self.regions = {
            n: RegionSession(n, fleet["lt"][n], fleet["pub"]) for n in params.participants
        }
        self.masked: dict[str, bytes] = {}
        self.self_seeds: dict[str, bytes] = {}

    def advertise(self, who: Sequence[str] | None = None) -> None:
        setup = self.agg.setup_message()
        self.ads = {}
        for n in who or self.p.participants:
            self.ads[n] = self.regions[n].on_setup(setup)
            self.agg.receive_advertisement(self.ads[n])
        self.keys = self.agg.keys_message()

    def share(self, who: Sequence[str] | None = None) -> None:
        for n in who or self.p.participants:
            self.agg.receive_shares(self.regions[n].on_keys(self.keys))
        self.routed = self.agg.routed_messages()

    def mask(self, who: Sequence[str] | None = None) -> None:
        for n in who or sorted(self.routed):
            seed = self.regions[n]._keys.self_seed  # type: ignore[union-attr]
            self.self_seeds[n] = seed
            self.masked[n] = self.regions[n].on_routed(self.routed[n], self.f["z"][n])
            self.agg.receive_masked_input(self.masked[n])
        self.request = self.agg.unmask_request()

    def unmask(self, who: Sequence[str] | None = None) -> np.ndarray:
        for n in who or sorted(self.masked):
            self.agg.receive_unmask(self.regions[n].on_unmask(self.request))
        return self.agg.result()

    def full(self, masked=None, answered=None) -> np.ndarray:
        self.advertise()
        self.share()
        self.mask(masked)
        return self.unmask(answered)


def _ring_sum(fleet: dict[str, Any], names: Sequence[str]) -> np.ndarray:
    b = fleet["q"].bit_width
    acc = np.zeros(DIM, dtype=np.uint64)
    for n in names:
        acc = masks.ring_add(acc, to_ring(fleet["z"][n], b), b)
    return acc


def _edit(data: bytes, **changes: Any) -> bytes:
    """The same message with some fields replaced (what a malicious relay can do)."""
    body = msgpack.unpackb(data, raw=False)
    body.update(changes)
    return msgpack.packb(body, use_bin_type=True)


# ---------------------------------------------------------------- quantisation and bit width


def test_bit_width_from_the_overflow_analysis() -> None:
    # R·(L·s + 1) + 12·σ_noise < 2^(b-1), smallest such b
    b = choose_bit_width(linf_bound=64.0, n_regions=4, scale=2.0**12, noise_std=2.0**14)
    bound = sum_bound(64.0, 4, 2.0**12, 2.0**14)
    assert bound < 2 ** (b - 1) and bound >= 2 ** (b - 2)
    assert choose_bit_width(0.0, 2, 1.0) == 16  # the floor
    with pytest.raises(SecAggConfigError, match="64-bit ring"):
        choose_bit_width(linf_bound=1e13, n_regions=4, scale=2.0**20)
    # a width below the analysis is refused up front ...
    with pytest.raises(SecAggConfigError, match="overflows"):
        Quantizer(scale=2.0**12, bit_width=b - 1, linf_bound=64.0, n_regions=4, noise_std=2.0**14)
    # ... because it really wraps: four regions at the bound sum past 2^(b-2) and flip sign
    small = b - 1
    z = np.full(8, int(64.0 * 2**12), dtype=np.int64)
    total = np.zeros(8, dtype=np.uint64)
    for _ in range(4):
        total = masks.ring_add(total, to_ring(z, small), small)
    assert np.all(from_ring(total, small) != 4 * z)


def test_quantizer_refuses_inputs_beyond_its_bound_and_round_trips() -> None:
    q = Quantizer.fitted(scale=2.0**10, linf_bound=2.0, n_regions=3)
    with pytest.raises(SecAggConfigError, match="exceeds the bound"):
        q.encode(np.array([0.0, 2.5]))
    with pytest.raises(SecAggConfigError, match="non-finite"):
        q.encode(np.array([np.nan]))
    x = np.array([-2.0, -0.3, 0.0, 1e-4, 1.999])
    for b in (16, 33, 64):
        z = np.array([-(2 ** (b - 1)), -5, 0, 7, 2 ** (b - 1) - 1], dtype=np.int64)
        assert np.array_equal(from_ring(to_ring(z, b), b), z)
    rng = np.random.default_rng(0)
    z = q.encode(np.tile(x, 20000), rng)  # randomised rounding is unbiased
    assert np.allclose(z.reshape(-1, 5).mean(0) / q.scale, x, atol=2e-4)
    assert np.max(np.abs(q.decode_sum(q.to_ring(q.encode(x))) - x)) <= 0.5 / q.scale


def test_round_params_enforce_the_threshold_rule() -> None:
    with pytest.raises(SecAggConfigError, match="t > n/2"):
        RoundParams("r", 0, NAMES, 2, 32, 10)  # 2 of 4: two halves could unmask one region
    with pytest.raises(SecAggConfigError):
        RoundParams("r", 0, ("a", "b", "c"), 1, 32, 10)
    with pytest.raises(SecAggConfigError, match="sorted"):
        RoundParams("r", 0, ("b", "a"), 2, 32, 10)


def test_shamir_any_t_shares_and_not_fewer() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, 5)
    assert shamir.combine({i: shares[i] for i in (1, 4, 5)}, 3) == secret
    assert shamir.combine({i: shares[i] for i in (2, 3, 5)}, 3) == secret
    with pytest.raises(ValueError):
        shamir.combine({i: shares[i] for i in (1, 2)}, 3)
    # t-1 shares interpolated as if t-1 were enough give a different value
    assert shamir.combine({i: shares[i] for i in (1, 2)}, 2) != secret


# ---------------------------------------------------------------- correctness


def test_masks_cancel_exactly_on_the_mlp_shape(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    r.advertise()
    r.share()
    r.mask()
    b = r.p.bit_width
    acc = np.zeros(DIM, dtype=np.uint64)
    for n, data in r.masked.items():
        y = np.frombuffer(msgpack.unpackb(data)["vector"], dtype=r.p.wire_dtype)
        assert not np.array_equal(from_ring(y.astype(np.uint64), b), fleet["z"][n])
        acc = masks.ring_add(acc, y.astype(np.uint64), b)
        acc = masks.ring_add(acc, masks.prg(r.self_seeds[n], DIM, b), b, -1)
    # with the self masks removed, the pairwise masks cancel to the exact integer sum
    assert np.array_equal(acc, _ring_sum(fleet, NAMES))
    # both ends of a pair derive the same seed, round-bound
    a, c = r.regions["cn"], r.regions["us"]
    s1 = masks.pairwise_seed(a._keys.mask_sk, c._ads["us"].mask_pk, r.p.tag, "cn", "us")  # type: ignore[union-attr]
    s2 = masks.pairwise_seed(c._keys.mask_sk, a._ads["cn"].mask_pk, r.p.tag, "us", "cn")  # type: ignore[union-attr]
    assert s1 == s2


def test_unmasked_sum_equals_the_plain_sum(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    total = r.full()
    assert np.array_equal(total, _ring_sum(fleet, NAMES))  # exact, integers
    floats = fleet["q"].decode_sum(total)
    plain = sum(fleet["x"][n] for n in NAMES)
    assert np.max(np.abs(floats - plain)) <= len(NAMES) * 0.5 / SCALE  # rounding only
    t = r.agg.transcript()
    assert t["status"] == "completed" and t["summed"] == list(NAMES)
    assert t["recovered_after_masking"] == [] and t["dropped_before_masking"] == []


def test_region_dropped_after_masking_is_recovered(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    total = r.full(answered=["cn", "eu", "jp"])  # "us" masked, then went silent
    assert np.array_equal(total, _ring_sum(fleet, NAMES))
    t = r.agg.transcript()
    assert t["recovered_after_masking"] == ["us"] and t["summed"] == list(NAMES)


def test_region_dropped_before_masking_is_excluded(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    r.advertise()
    r.share()
    r.mask(["cn", "eu", "jp"])  # "us" shared keys, sent no masked input in time
    late = r.regions["us"].on_routed(r.routed["us"], fleet["z"]["us"])
    with pytest.raises(SecAggRefused, match="out of stage"):
        r.agg.receive_masked_input(late)  # too late: it counts as dropped
    with pytest.raises(SecAggRefused, match="survivor"):
        r.regions["us"].on_unmask(r.request)  # and it reveals nothing about the others
    total = r.unmask()
    assert np.array_equal(total, _ring_sum(fleet, ["cn", "eu", "jp"]))
    t = r.agg.transcript()
    assert t["dropped_before_masking"] == ["us"] and t["summed"] == ["cn", "eu", "jp"]


def test_wide_ring_over_32_bits(fleet: dict[str, Any]) -> None:
    p = RoundParams("run-1", 9, NAMES[:3], 2, 40, DIM)
    assert p.wire_dtype == "<u8"
    r = Round(fleet, p)
    total = r.full(masked=["cn", "eu"], answered=["cn", "eu"])  # jp dropped before masking
    want = to_ring(fleet["z"]["cn"] + fleet["z"]["eu"], 40)
    assert np.array_equal(total, want)


# ---------------------------------------------------------------- aborts


def test_below_threshold_survivors_abort_without_unmasking(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    r.advertise()
    r.share()
    for n in ("cn", "eu"):  # two of four masked, t = 3
        r.agg.receive_masked_input(r.regions[n].on_routed(r.routed[n], fleet["z"][n]))
    with pytest.raises(SecAggAbort, match="fewer than the threshold"):
        r.agg.unmask_request()
    assert r.agg.held_state()["_sum"] is None
    with pytest.raises(SecAggRefused):
        r.agg.result()
    assert r.agg.transcript()["status"] == "aborted"


def test_too_few_unmask_answers_abort(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    r.advertise()
    r.share()
    r.mask()
    for n in ("cn", "eu"):  # only two of three needed answers
        r.agg.receive_unmask(r.regions[n].on_unmask(r.request))
    with pytest.raises(SecAggAbort):
        r.agg.result()
    held = r.agg.held_state()
    assert held["_sum"] is None and held["_result"] is None and not held["_unmask"]


def test_region_refuses_an_unmask_request_below_threshold(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    r.advertise()
    r.share()
    r.mask()
    forged = _edit(r.request, survivors=["cn", "eu"], dropped=["jp", "us"])
    with pytest.raises(SecAggRefused, match="threshold"):
        r.regions["cn"].on_unmask(forged)


# ---------------------------------------------------------------- refusals


def test_tampered_share_ciphertext_is_refused(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    r.advertise()
    r.share()
    body = msgpack.unpackb(r.routed["eu"], raw=False)
    ct = bytearray(body["ciphertexts"]["cn"])
    ct[-5] ^= 1
    bad = _edit(r.routed["eu"], ciphertexts={**body["ciphertexts"], "cn": bytes(ct)})
    with pytest.raises(SecAggRefused, match="does not authenticate"):
        r.regions["eu"].on_routed(bad, fleet["z"]["eu"])
    assert r.regions["eu"].stage == "routed"  # nothing changed; the genuine message still works
    r.agg.receive_masked_input(r.regions["eu"].on_routed(r.routed["eu"], fleet["z"]["eu"]))


def test_redirected_share_ciphertext_is_refused(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    r.advertise()
    r.share()
    # the share cn dealt to jp, handed to eu as if cn had dealt it to eu
    to_jp = msgpack.unpackb(r.routed["jp"], raw=False)["ciphertexts"]["cn"]
    body = msgpack.unpackb(r.routed["eu"], raw=False)
    bad = _edit(r.routed["eu"], ciphertexts={**body["ciphertexts"], "cn": to_jp})
    with pytest.raises(SecAggRefused):
        r.regions["eu"].on_routed(bad, fleet["z"]["eu"])


def test_tampered_share_in_an_unmask_answer_is_refused(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    r.advertise()
    r.share()
    r.mask(["cn", "eu", "jp"])  # us dropped: its mask-key shares are asked for
    ans = r.regions["jp"].on_unmask(r.request)
    body = msgpack.unpackb(ans, raw=False)
    share = bytearray(body["key_shares"]["us"])
    share[0] ^= 0x80
    with pytest.raises(SecAggRefused, match="bad signature"):
        r.agg.receive_unmask(_edit(ans, key_shares={"us": bytes(share)}))
    assert r.agg.transcript()["refused"][-1]["region"] == "jp"
    r.agg.receive_unmask(ans)  # the genuine answer still counts
    for n in ("cn", "eu"):
        r.agg.receive_unmask(r.regions[n].on_unmask(r.request))
    assert np.array_equal(r.agg.result(), _ring_sum(fleet, ["cn", "eu", "jp"]))


def test_replayed_messages_are_refused(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    r.advertise()
    with pytest.raises(SecAggRefused, match="out of stage"):  # an advert after the stage closed
        r.agg.receive_advertisement(r.ads["cn"])
    with pytest.raises(SecAggRefused, match="stage"):  # the region already advertised
        r.regions["cn"].on_setup(r.agg.setup_message())
    r.share()
    with pytest.raises(SecAggRefused):  # keys replayed to a region that already dealt shares
        r.regions["cn"].on_keys(r.keys)
    r.mask()
    with pytest.raises(SecAggRefused, match="stage"):  # masked input replayed after the stage
        r.agg.receive_masked_input(r.masked["cn"])
    ans = r.regions["cn"].on_unmask(r.request)
    r.agg.receive_unmask(ans)
    with pytest.raises(SecAggRefused, match="duplicate"):
        r.agg.receive_unmask(ans)
    with pytest.raises(SecAggRefused, match="stage"):  # a region answers an unmask request once
        r.regions["cn"].on_unmask(r.request)
    for n in ("eu", "jp", "us"):
        r.agg.receive_unmask(r.regions[n].on_unmask(r.request))
    assert np.array_equal(r.agg.result(), _ring_sum(fleet, NAMES))  # nothing counted twice


def test_duplicate_masked_input_within_the_stage_is_refused(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    r.advertise()
    r.share()
    m = r.regions["cn"].on_routed(r.routed["cn"], fleet["z"]["cn"])
    r.agg.receive_masked_input(m)
    with pytest.raises(SecAggRefused, match="duplicate"):
        r.agg.receive_masked_input(m)


def test_messages_from_another_round_are_refused(fleet: dict[str, Any]) -> None:
    old = Round(fleet, _params(fleet, rnd=5))
    setup = old.agg.setup_message()
    ad = old.regions["cn"].on_setup(setup)
    new = AggregatorSession(_params(fleet, rnd=6), fleet["pub"])
    with pytest.raises(SecAggRefused, match="bad signature"):
        new.receive_advertisement(ad)  # the signature binds run, round and parameters


def test_substituted_advertisement_key_is_refused(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    r.advertise()
    body = msgpack.unpackb(r.keys, raw=False)
    evil = sk.raw_public(X25519PrivateKey.generate())
    ads = [dict(a, share_pk=evil) if a["region"] == "eu" else a for a in body["advertisements"]]
    with pytest.raises(SecAggRefused, match="advertisement of eu: bad signature"):
        r.regions["cn"].on_keys(_edit(r.keys, advertisements=ads))
    # the aggregator refuses it on arrival too, and a region's own altered advert is noticed
    agg = AggregatorSession(_params(fleet, rnd=7), fleet["pub"])
    reg = RegionSession("eu", fleet["lt"]["eu"], fleet["pub"])
    ad = reg.on_setup(agg.setup_message())
    with pytest.raises(SecAggRefused, match="bad signature"):
        agg.receive_advertisement(_edit(ad, mask_pk=evil))
    # an advert signed with a key that is not eu's long-term key
    forged = Ed25519PrivateKey.generate()
    other = RegionSession("eu", forged, {**fleet["pub"], "eu": forged.public_key()})
    with pytest.raises(SecAggRefused, match="bad signature"):
        agg.receive_advertisement(other.on_setup(agg.setup_message()))
    agg.receive_advertisement(ad)


def test_region_refuses_to_reveal_both_secrets_of_one_peer(fleet: dict[str, Any]) -> None:
    r = Round(fleet, _params(fleet))
    r.advertise()
    r.share()
    r.mask()  # us masked; a cheating aggregator claims it dropped AND asks for its self mask
    greedy = _edit(r.request, survivors=list(NAMES), dropped=["us"])
    for n in ("cn", "eu", "jp"):
        with pytest.raises(SecAggRefused, match="both the self mask and the mask key"):
            r.regions[n].on_unmask(greedy)
    # having answered once (self mask of us), a region will not give its mask key later
    r.regions["cn"].on_unmask(r.request)
    late = _edit(r.request, survivors=["cn", "eu", "jp"], dropped=["us"])
    with pytest.raises(SecAggRefused, match="stage"):
        r.regions["cn"].on_unmask(late)


def test_region_policy_hook_refuses_a_weak_setup(fleet: dict[str, Any]) -> None:
    """A region whose policy needs min_honest_regions = 3 refuses a round with t = 2."""

    def accept(p: RoundParams) -> None:
        if p.threshold < 3:
            raise SecAggRefused(f"threshold {p.threshold} below this region's minimum 3")

    agg = AggregatorSession(_params(fleet, names=("cn", "eu", "jp"), t=2), fleet["pub"])
    reg = RegionSession("cn", fleet["lt"]["cn"], fleet["pub"], accept=accept)
    with pytest.raises(SecAggRefused, match="minimum 3"):
        reg.on_setup(agg.setup_message())
    assert reg.stage == "setup"
    ok = AggregatorSession(_params(fleet, names=("cn", "eu", "jp"), t=3), fleet["pub"])
    ok.receive_advertisement(reg.on_setup(ok.setup_message()))


def test_non_participants_are_refused(fleet: dict[str, Any]) -> None:
    p = _params(fleet, names=("cn", "eu", "jp"), t=2)
    agg = AggregatorSession(p, fleet["pub"])
    outsider = RegionSession("us", fleet["lt"]["us"], fleet["pub"])
    with pytest.raises(SecAggRefused, match="not a participant"):
        outsider.on_setup(agg.setup_message())
    ad = RegionSession("us", fleet["lt"]["us"], fleet["pub"]).on_setup(
        AggregatorSession(_params(fleet), fleet["pub"]).setup_message()
    )
    with pytest.raises(SecAggRefused, match="not a participant"):
        agg.receive_advertisement(ad)
    with pytest.raises(SecAggRefused):
        agg.receive_advertisement(b"\x00garbage")


# ---------------------------------------------------------------- the aggregator's state


def _arrays(obj: Any) -> Iterator[np.ndarray]:
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v)
    elif isinstance(obj, list | tuple | set):
        for v in obj:
            yield from _arrays(v)
    elif hasattr(obj, "__dict__"):
        yield from _arrays(vars(obj))


@pytest.mark.parametrize("masked,answered", [(None, None), (NAMES[:3], None), (None, NAMES[:3])])
def test_aggregator_never_holds_an_individual_unmasked_vector(
    fleet: dict[str, Any], masked, answered
) -> None:
    b = fleet["q"].bit_width
    individual = {n: to_ring(fleet["z"][n], b) for n in NAMES}
    seen: list[str] = []
    vectors_seen = 0

    def check(event: str) -> None:
        nonlocal vectors_seen
        seen.append(event)
        for arr in _arrays(r.agg.held_state()):
            if arr.size != DIM:
                continue
            vectors_seen += 1
            a = arr.astype(np.uint64) & ring_mask(b)
            for n, z in individual.items():
                assert not np.array_equal(a, z), f"held {n}'s unmasked vector after {event}"

    r = Round(fleet, _params(fleet), observer=check)
    total = r.full(masked, answered)
    assert "completed" in seen and any(e.startswith("removed self mask") for e in seen)
    assert vectors_seen > 5  # the walk did see the running sum at every step
    assert not any(isinstance(v, bytes) and len(v) >= DIM * 4 for v in vars(r.agg).values())
    want = NAMES if masked is None else masked
    assert np.array_equal(total, _ring_sum(fleet, want))


def test_region_state_survives_export_and_restore_between_messages(fleet: dict[str, Any]) -> None:
    """A ClientApp may run every message in a fresh process: each stage restores from bytes."""
    p = _params(fleet)
    agg = AggregatorSession(p, fleet["pub"])
    saved: dict[str, bytes] = {}

    def step(n: str, call) -> bytes:
        s = (
            RegionSession.restore(saved[n], fleet["lt"][n], fleet["pub"])
            if n in saved
            else RegionSession(n, fleet["lt"][n], fleet["pub"])
        )
        out = call(s)
        saved[n] = s.export_state()
        return out

    setup = agg.setup_message()
    for n in NAMES:
        agg.receive_advertisement(step(n, lambda s: s.on_setup(setup)))
    km = agg.keys_message()
    for n in NAMES:
        agg.receive_shares(step(n, lambda s: s.on_keys(km)))
    routed = agg.routed_messages()
    for n in NAMES[:3]:
        agg.receive_masked_input(step(n, lambda s, n=n: s.on_routed(routed[n], fleet["z"][n])))
    req = agg.unmask_request()
    for n in NAMES[:3]:
        agg.receive_unmask(step(n, lambda s: s.on_unmask(req)))
    assert np.array_equal(agg.result(), _ring_sum(fleet, NAMES[:3]))
    done = RegionSession.restore(saved["cn"], fleet["lt"]["cn"], fleet["pub"])
    with pytest.raises(SecAggRefused, match="stage"):  # a restored session still answers once
        done.on_unmask(req)
    with pytest.raises(SecAggRefused, match="unusable"):
        RegionSession.restore(b"junk", fleet["lt"]["cn"], fleet["pub"])


def test_bench_script_runs(tmp_path, monkeypatch, capsys) -> None:
    """experiments/bench_secagg.py at one repeat (it also checks the sum it unmasks)."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "experiments" / "bench_secagg.py"
    spec = importlib.util.spec_from_file_location("bench_secagg", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["bench_secagg.py", "--regions", "3", "--dropped", "0,1", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path)])
    mod.main()
    data = json.loads((tmp_path / "bench_secagg.json").read_text())
    assert data["dim"] == DIM and data["plain_update_bytes"] == 4 * DIM
    ups = [r for r in data["rows"] if r["part"] == "up" and r["stage"] == "masked input"]
    assert ups and all(4 * DIM < r["value"] < 4 * DIM + 1024 for r in ups)  # b <= 32: uint32
    assert "R=3, 1 dropped" in capsys.readouterr().out
