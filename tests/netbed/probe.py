"""Tiny network probes run inside a namespace: a TCP sink, and a client that tries destinations.

`probe.py listen ADDR PORT`           accept connections and read until EOF (prints `ready`)
`probe.py try PAYLOAD tcp:ADDR:PORT udp:ADDR:PORT ...`
                                       try each destination with a short timeout, send PAYLOAD,
                                       print one JSON object {dest: "ok" | error name}
"""

from __future__ import annotations

import json
import socket
import sys
import threading


def listen(addr: str, port: int) -> None:
    """Accept and drain connections forever (killed by the test bed)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(16)
    print("ready", flush=True)

    def drain(conn: socket.socket) -> None:
        with conn:
            while conn.recv(65536):
                pass

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def attempt(dest: str, payload: bytes, timeout: float = 1.0) -> str:
    """Try one `proto:addr:port` destination; `ok` when it connected (TCP) or was sent (UDP)."""
    proto, addr, port = dest.split(":")
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    s.settimeout(timeout)
    try:
        if proto == "tcp":
            s.connect((addr, int(port)))
            s.sendall(payload)
        else:
            s.sendto(payload, (addr, int(port)))
        return "ok"
    except OSError as exc:  # a firewall drop shows as a timeout or EPERM
        return type(exc).__name__ if not exc.errno else f"{type(exc).__name__}:{exc.errno}"
    finally:
        s.close()


def main(argv: list[str]) -> int:
    if argv[0] == "listen":
        listen(argv[1], int(argv[2]))
        return 0
    payload = argv[1].encode()
    print(json.dumps({d: attempt(d, payload) for d in argv[2:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
