"""Multi-host test bed for fedfsd: network namespaces, firewalls, capture (see bed.py)."""

from .bed import (
    AGG_ADDR,
    NetBed,
    NetBedUnavailable,
    list_namespaces,
    remove_stale,
    unavailable_reason,
)
from .packets import canary_needles, find_needles, foreign_traffic, read_pcap, tcp_streams

__all__ = [
    "AGG_ADDR",
    "NetBed",
    "NetBedUnavailable",
    "canary_needles",
    "find_needles",
    "foreign_traffic",
    "list_namespaces",
    "read_pcap",
    "remove_stale",
    "tcp_streams",
    "unavailable_reason",
]
