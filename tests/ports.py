"""Free loopback ports for the servers the tests start themselves (Redis nodes, clusters)."""
from __future__ import annotations

import socket


def free_port(bus: bool = False) -> int:
    """A port free on 127.0.0.1 now; with ``bus``, port + 10000 (a Redis Cluster node's bus) is free too.

    Free now only: a server started on it later may find it taken, so starters retry on another."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus:
            return port
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port on 127.0.0.1" + (" with its cluster bus port" if bus else ""))
