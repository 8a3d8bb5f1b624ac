"""Self-test of the multi-host test bed: isolation, firewall, capture and teardown.

These run no federation; they prove the instruments the residency and fault tests rely on can
see a leak (a canary sent on the allowed port IS found) and that the firewall blocks everything
but the Fleet API port.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
from netbed import (
    AGG_ADDR,
    NetBed,
    canary_needles,
    find_needles,
    foreign_traffic,
    list_namespaces,
    read_pcap,
)
from netbed.fixtures import netbed  # noqa: F401 - fixture
from netbed.packets import decode_frame, tcp_streams

PROBE = str(Path(__file__).parent / "netbed" / "probe.py")
pytestmark = pytest.mark.residency


def _listen(bed: NetBed, host: str, addr: str, port: int) -> None:
    proc = bed.popen(host, [sys.executable, PROBE, "listen", addr, str(port)], stdout=-1)
    assert proc.stdout.readline().strip() == b"ready"


def _try(bed: NetBed, host: str, payload: str, *dests: str) -> dict[str, str]:
    res = bed.run(host, [sys.executable, PROBE, "try", payload, *dests], timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_bed_layout_and_teardown(tmp_path):
    """Each host has its own namespace and address, no default route; down() removes them all."""
    from netbed.require import require_netbed

    require_netbed()
    bed = NetBed(workdir=tmp_path)
    with bed:
        names = [h.ns for h in bed.hosts.values()]
        assert len(set(names)) == 4 and all(n in list_namespaces() for n in names)
        addrs = {h.addr for h in bed.hosts.values()}
        assert len(addrs) == 4
        for h in bed.regions():
            routes = bed.run(h, ["ip", "route", "show"]).stdout
            assert "default" not in routes and "10.213.0.0/24" in routes
            assert bed.run(h, ["ip", "-6", "addr", "show"]).stdout.strip() == ""
        # a process left running inside a namespace is killed at teardown
        sleeper = bed.popen("r1", ["sleep", "300"])
    assert sleeper.poll() is not None
    assert not any(n in list_namespaces() for n in names)
    bed.down()  # idempotent


def test_firewall_allows_only_fleet_port(netbed):  # noqa: F811
    """A region reaches the aggregator's Fleet API port; another aggregator port, another
    region, and UDP are dropped by the region's own firewall (its drop counter rises)."""
    bed = netbed
    other = bed.hosts["r1"].addr
    _listen(bed, "agg", "0.0.0.0", bed.fleet_port)
    _listen(bed, "agg", "0.0.0.0", 9093)
    _listen(bed, "r1", "0.0.0.0", bed.fleet_port)
    before = bed.dropped("r0")
    got = _try(
        bed, "r0", "hello",
        f"tcp:{AGG_ADDR}:{bed.fleet_port}", f"tcp:{AGG_ADDR}:9093", f"tcp:{AGG_ADDR}:8000",
        f"tcp:{other}:{bed.fleet_port}", f"udp:{AGG_ADDR}:53", "tcp:10.213.1.1:443",
    )  # fmt: skip
    assert got.pop(f"tcp:{AGG_ADDR}:{bed.fleet_port}") == "ok"
    assert all(v != "ok" for v in got.values()), got
    # no route leaves the private subnet at all: the kernel refuses before any packet exists
    assert got.pop("tcp:10.213.1.1:443") == "OSError:101", got
    after = bed.dropped("r0")
    assert after["out"] >= before["out"] + len(got), (before, after)
    # the other region's listener is reachable from the aggregator host (so the block is the
    # region firewall, not a missing listener) ... but the aggregator cannot dial into r1 either
    assert _try(bed, "agg", "x", f"tcp:{AGG_ADDR}:9093")[f"tcp:{AGG_ADDR}:9093"] == "ok"
    assert _try(bed, "agg", "x", f"tcp:{other}:{bed.fleet_port}") != {
        f"tcp:{other}:{bed.fleet_port}": "ok"
    }


def test_capture_sees_a_planted_leak(netbed, tmp_path):  # noqa: F811
    """Positive control: a canary deliberately sent on the allowed port is found by the capture,
    in text and float encodings, even when split across TCP segments."""
    bed = netbed
    _listen(bed, "agg", "0.0.0.0", bed.fleet_port)
    vid = "CANARY-VEH-selftest-7f3a"
    coord = 48213.0917
    pcap = tmp_path / "r0.pcap"
    leak = vid + "|" + struct.pack("<d", coord).hex()
    with bed.capture("r0", pcap):
        _try(bed, "r0", leak + "x" * 100_000, f"tcp:{AGG_ADDR}:{bed.fleet_port}")
        _try(bed, "r0", "A", f"tcp:{bed.hosts['r1'].addr}:{bed.fleet_port}")  # dropped
        time.sleep(0.2)
    packets = read_pcap(pcap)
    assert len(packets) >= 4
    assert foreign_traffic(packets, bed.hosts["r0"].addr, AGG_ADDR, bed.fleet_port) == []
    hits = find_needles(packets, canary_needles(vid, [coord]))
    assert any("vehicle_id utf-8" in h for h in hits), hits
    assert not any("float64" in h for h in hits)  # sent as hex text, not as raw float bytes


def test_stream_reassembly_finds_split_needle():
    """A needle split over two out-of-order TCP segments is found in the rebuilt stream only."""

    def frame(seq: int, payload: bytes, flags: int = 0x18) -> bytes:
        tcp = struct.pack("!HHIIBBHHH", 5000, 9092, seq, 0, 5 << 4, flags, 65535, 0, 0)
        total = 20 + len(tcp) + len(payload)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 6, 0,
                         bytes([10, 213, 0, 11]), bytes([10, 213, 0, 1]))  # fmt: skip
        return b"\0" * 12 + b"\x08\x00" + ip + tcp + payload

    pkts = [decode_frame(frame(99, b"", 0x02)), decode_frame(frame(103, b"NARY")),
            decode_frame(frame(100, b"\x00CA"))]  # fmt: skip
    assert tcp_streams(pkts)[("10.213.0.11", 5000, "10.213.0.1", 9092)][:8] == b"\x00CANARY"
    hits = find_needles(pkts, {"c": b"CANARY"})
    assert hits == ["c in TCP stream 10.213.0.11:5000 -> 10.213.0.1:9092"]
