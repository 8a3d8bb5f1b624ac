"""Capture every frame on one interface into a pcap file (stdlib only, AF_PACKET raw socket).

Run inside a network namespace (`ip netns exec NS python capture.py eth0 out.pcap`); it prints
`ready` once the socket is bound, so a test knows nothing is missed, and stops on SIGTERM.
A pure-Python capture avoids installing tcpdump on CI machines.
"""

from __future__ import annotations

import select
import signal
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
SNAPLEN = 262144  # veth offloads hand over GSO super-frames up to 64 KiB


def main(iface: str, out: str) -> int:
    """Write a classic pcap (LINKTYPE_ETHERNET) of both directions of `iface` until SIGTERM."""
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind((iface, 0))
    with open(out, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, 1))
        fh.flush()
        print("ready", flush=True)
        while not stop:
            try:
                readable, _, _ = select.select([sock], [], [], 0.2)
            except InterruptedError:
                continue
            for _ in readable:
                frame = sock.recv(SNAPLEN)
                now = time.time()
                sec = int(now)
                usec = int((now - sec) * 1e6)
                fh.write(struct.pack("<IIII", sec, usec, len(frame), len(frame)))
                fh.write(frame)
            fh.flush()
        # drain what the kernel still holds
        sock.setblocking(False)
        while True:
            try:
                frame = sock.recv(SNAPLEN)
            except BlockingIOError:
                break
            now = time.time()
            fh.write(struct.pack("<IIII", int(now), 0, len(frame), len(frame)))
            fh.write(frame)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
