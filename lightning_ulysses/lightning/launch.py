"""The main port of a job that Lightning launches itself (one node, ``devices=N``, no torchrun / SLURM / MPI).

Lightning's launcher takes a free *ephemeral* port (``bind(("", 0))``) as ``MASTER_PORT``. While rank 0 is still
starting, the other ranks retry connecting to ``localhost:MASTER_PORT``, and the kernel hands each retry the next
ephemeral *source* port -- the range ``MASTER_PORT`` came from. When a retry's source port equals ``MASTER_PORT`` the
connection is made to itself (TCP simultaneous open), and rank 0 then fails to listen there (``EADDRINUSE``); seen on
2-core machines, where rank 0 starts slowly. A port below the ephemeral range cannot be handed out as a source port.
"""

from __future__ import annotations

import os
import random
import socket
from typing import Any

EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux), or IANA's default elsewhere."""
    try:
        with open(EPHEMERAL_RANGE_FILE) as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 49152, 65535


def port_outside_ephemeral_range(attempts: int = 64) -> int:
    """A free TCP port below the ephemeral range (between 10000 and its start)."""
    low, _ = ephemeral_range()
    rng = random.Random()  # not the training seed's stream
    for _ in range(attempts):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 10000 and {low}; set MASTER_PORT.")


def choose_main_port(cluster_environment: Any, num_nodes: int) -> None:
    """Set ``MASTER_PORT`` for a single-node job Lightning launches itself, unless the user (or a launcher) set it."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    if (
        type(cluster_environment) is LightningEnvironment
        and not cluster_environment.creates_processes_externally
        and num_nodes == 1
        and "MASTER_PORT" not in os.environ
        and "STANDALONE_PORT" not in os.environ
    ):
        os.environ["MASTER_PORT"] = str(port_outside_ephemeral_range())


__all__ = ["choose_main_port", "ephemeral_range", "port_outside_ephemeral_range"]
