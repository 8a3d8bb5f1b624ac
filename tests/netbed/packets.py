"""Parse a pcap written by `capture.py`, rebuild TCP byte streams and search them for canaries.

Why rebuild streams: a canary can straddle two TCP segments, so searching single frames alone
could miss it. Both the raw frames and the reassembled streams are searched.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ETH_IPV4 = 0x0800
ETH_ARP = 0x0806
ETH_IPV6 = 0x86DD
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMP = 1


@dataclass(frozen=True)
class Packet:
    """One captured Ethernet frame, decoded as far as fedfsd's tests need."""

    raw: bytes
    eth_type: int
    proto: int | None = None  # IP protocol number, None when not IPv4
    src: str | None = None
    dst: str | None = None
    sport: int | None = None
    dport: int | None = None
    seq: int | None = None
    flags: int = 0
    payload: bytes = b""

    @property
    def syn(self) -> bool:
        return bool(self.flags & 0x02)

    def describe(self) -> str:
        """One line for assertion messages."""
        if self.proto is None:
            return f"ethertype 0x{self.eth_type:04x} ({len(self.raw)} bytes)"
        return f"proto {self.proto} {self.src}:{self.sport} -> {self.dst}:{self.dport}"


def read_pcap(path: str | Path) -> list[Packet]:
    """Decode every frame of a classic little-endian pcap file."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path}: not a pcap file (only {len(data)} bytes)")
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic != 0xA1B2C3D4:
        raise ValueError(f"{path}: unexpected pcap magic 0x{magic:08x}")
    out: list[Packet] = []
    pos = 24
    while pos + 16 <= len(data):
        _, _, incl, _ = struct.unpack_from("<IIII", data, pos)
        pos += 16
        frame = data[pos : pos + incl]
        pos += incl
        out.append(decode_frame(frame))
    return out


def decode_frame(frame: bytes) -> Packet:
    """Decode Ethernet + IPv4 + TCP/UDP headers; anything else keeps only its ethertype."""
    if len(frame) < 14:
        return Packet(raw=frame, eth_type=-1)
    eth_type = struct.unpack_from("!H", frame, 12)[0]
    if eth_type != ETH_IPV4 or len(frame) < 34:
        return Packet(raw=frame, eth_type=eth_type)
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack_from("!H", ip, 2)[0] or len(ip)  # 0 can appear on TSO frames
    proto = ip[9]
    src = str(ipaddress.IPv4Address(ip[12:16]))
    dst = str(ipaddress.IPv4Address(ip[16:20]))
    body = ip[ihl:total]
    if proto == PROTO_TCP and len(body) >= 20:
        sport, dport, seq = struct.unpack_from("!HHI", body, 0)
        doff = (body[12] >> 4) * 4
        return Packet(frame, eth_type, proto, src, dst, sport, dport, seq, body[13], body[doff:])
    if proto == PROTO_UDP and len(body) >= 8:
        sport, dport = struct.unpack_from("!HH", body, 0)
        return Packet(frame, eth_type, proto, src, dst, sport, dport, payload=body[8:])
    return Packet(frame, eth_type, proto, src, dst, payload=body)


def tcp_streams(packets: list[Packet]) -> dict[tuple[str, int, str, int], bytes]:
    """Reassemble each TCP direction by sequence number (retransmissions overwrite in place)."""
    segs: dict[tuple[str, int, str, int], list[Packet]] = defaultdict(list)
    for p in packets:
        if p.proto == PROTO_TCP:
            segs[(p.src, p.sport, p.dst, p.dport)].append(p)  # type: ignore[index]
    streams: dict[tuple[str, int, str, int], bytes] = {}
    for key, items in segs.items():
        syn = next((p for p in items if p.syn), None)
        base = (syn.seq + 1) if syn is not None else min(p.seq for p in items if p.seq is not None)
        buf = bytearray()
        for p in items:
            if not p.payload or p.seq is None:
                continue
            off = (p.seq - base) % (1 << 32)
            if off > 1 << 30:  # data from before the capture's first sequence number
                continue
            end = off + len(p.payload)
            if end > len(buf):
                buf.extend(b"\0" * (end - len(buf)))
            buf[off:end] = p.payload
        streams[key] = bytes(buf)
    return streams


def find_needles(packets: list[Packet], needles: dict[str, bytes]) -> list[str]:
    """Return a description of every place a needle occurs: raw frames and rebuilt TCP streams."""
    hits: list[str] = []
    for i, p in enumerate(packets):
        for name, needle in needles.items():
            if needle in p.raw:
                hits.append(f"{name} in frame {i} ({p.describe()})")
    for key, stream in tcp_streams(packets).items():
        for name, needle in needles.items():
            if needle in stream:
                hits.append(f"{name} in TCP stream {key[0]}:{key[1]} -> {key[2]}:{key[3]}")
    return hits


def canary_needles(vehicle_id: str, coords: list[float]) -> dict[str, bytes]:
    """Every encoding under which a canary could travel: text and float32/float64, both endians."""
    needles = {
        "vehicle_id utf-8": vehicle_id.encode("utf-8"),
        "vehicle_id utf-16-le": vehicle_id.encode("utf-16-le"),
    }
    for c in coords:
        needles[f"{c!r} float32 le"] = struct.pack("<f", c)
        needles[f"{c!r} float32 be"] = struct.pack(">f", c)
        needles[f"{c!r} float64 le"] = struct.pack("<d", c)
        needles[f"{c!r} float64 be"] = struct.pack(">d", c)
        needles[f"{c!r} text"] = repr(c).encode()
    return needles


def foreign_traffic(packets: list[Packet], region: str, agg: str, port: int) -> list[str]:
    """Every frame that is not TCP between `region` and the aggregator's Fleet API `port`."""
    bad = []
    for p in packets:
        ok = p.proto == PROTO_TCP and (
            (p.src == region and p.dst == agg and p.dport == port)
            or (p.src == agg and p.dst == region and p.sport == port)
        )
        if not ok:
            bad.append(p.describe())
    return bad
