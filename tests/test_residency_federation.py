"""Data residency, shown on the wire: a real federation across namespace hosts, every packet of
one region's link captured, searched for canaries planted in that region's fleet logs.

TLS IS OFF IN THIS TEST (SuperLink and SuperNodes run with `--insecure`, no node auth) so that
the captured bytes are readable plaintext gRPC; a positive control checks that the update's
manifest (run id, sha256 digest from the region's own ledger) is indeed visible in the capture,
so a canary would have been visible too. Every other federation test runs with TLS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from netbed import AGG_ADDR, canary_needles, find_needles, foreign_traffic, read_pcap
from netbed.federation import NetFederation, policy_toml, run_config
from netbed.fixtures import fleet_data, netbed  # noqa: F401 - fixtures
from netbed.fleetdata import copy_dataset, plant_canary
from netbed.packets import tcp_streams

from fedfsd.deploy.federation import RegionSpec

pytestmark = pytest.mark.residency
PROBE = str(Path(__file__).parent / "netbed" / "probe.py")
PLACEMENT = {"eu": "r0", "us": "r1", "cn": "r2"}


def _releases(ledger: Path) -> list[dict]:
    if not ledger.exists():
        return []
    rows = [json.loads(x) for x in ledger.read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("kind") == "release"]


def test_canaries_never_cross_the_region_link(netbed, fleet_data, tmp_path):  # noqa: F811
    """Plant a unique vehicle id and unique coordinates in eu's logs, federate 1 round with eu on
    host r0, capture every frame on r0's link: no canary in any encoding, only TCP to the
    aggregator's Fleet API port; a region process dialling anything else is dropped."""
    from fedfsd.data.vehicles import load_vehicle_frames

    bed = netbed
    eu_data = copy_dataset(fleet_data["eu"], tmp_path / "data" / "eu")
    canary = plant_canary(eu_data)
    frames = load_vehicle_frames(eu_data, split="all")  # the canary is really in the training data
    assert canary.vehicle_id in frames.vehicle_ids

    specs = {}
    for region in PLACEMENT:
        rdir = tmp_path / region
        rdir.mkdir()
        (rdir / "policy.toml").write_text(policy_toml(region))
        data = eu_data if region == "eu" else fleet_data[region]
        specs[region] = RegionSpec(data, rdir / "policy.toml", rdir / "ledger.jsonl")

    run_id = f"residency-{tmp_path.name[-12:]}"
    pcap = tmp_path / "eu-link.pcap"
    dropped_before = bed.dropped("r0")["out"]
    with bed.capture("r0", pcap):
        with NetFederation(bed, tmp_path / "fed", specs, PLACEMENT, tls=False) as fed:
            fed.wait_connected()
            run = fed.start_run(
                run_config(tmp_path / "agg", run_id, rounds=1, **{"min-regions": 3})
            )
            # while the federation runs, a process on the eu host tries other destinations
            probe = bed.run("r0", [sys.executable, PROBE, "try", canary.vehicle_id,
                                   f"tcp:{AGG_ADDR}:9091", f"tcp:{AGG_ADDR}:22",
                                   f"tcp:{bed.hosts['r1'].addr}:9094", f"udp:{AGG_ADDR}:53",
                                   f"tcp:{bed.hosts['r2'].addr}:{bed.fleet_port}"])  # fmt: skip
            status = fed.wait_run(run, timeout=400, poll=3.0)
    assert status == "finished:completed", status
    blocked = json.loads(probe.stdout)
    assert all(v != "ok" for v in blocked.values()), blocked
    assert bed.dropped("r0")["out"] >= dropped_before + len(blocked)

    releases = _releases(tmp_path / "eu" / "ledger.jsonl")
    assert [r["round"] for r in releases] == [1] and releases[0]["run_id"] == run_id

    packets = read_pcap(pcap)
    streams = tcp_streams(packets)
    total = sum(len(s) for s in streams.values())
    # positive control: plaintext gRPC, and the region's release is on the wire
    wire_bytes = b"".join(streams.values())
    assert run_id.encode() in wire_bytes
    assert releases[0]["update_sha256"].encode() in wire_bytes
    assert total > 10_000, total

    assert foreign_traffic(packets, bed.hosts["r0"].addr, AGG_ADDR, bed.fleet_port) == []
    hits = find_needles(packets, canary_needles(canary.vehicle_id, canary.coords))
    assert hits == [], hits
    print(f"\n[residency] {len(packets)} frames, {total} TCP payload bytes captured on eu's link; "
          f"{len(canary_needles(canary.vehicle_id, canary.coords))} canary encodings, 0 found; "
          f"blocked: {blocked}")  # fmt: skip
