"""A local Redis Cluster for the tests (the product never starts one): masters started as
``ledger.app.servers.RedisServer`` in cluster mode, joined with ``redis-cli --cluster create``."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ledger.app.servers import (
    HOST,
    RedisServer,
    ServerError,
    _port_is_free,
    _redis_command,
    find_binary,
    free_port,
    start_redis,
)


def _free_cluster_port() -> int:
    """A free port ``p`` whose cluster bus port ``p + 10000`` is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 <= 65535 and _port_is_free(port + 10000):
            return port
    raise ServerError("could not find a free port pair (p, p+10000) for a Redis Cluster node")


@dataclass
class RedisCluster:
    """A local Redis Cluster: one master per node, no replicas, all 16384 slots covered."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        """The first node's URL (a cluster client discovers the others from it)."""
        return self.nodes[0].url

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


def start_redis_cluster(
    workdir: Path, masters: int = 3, *, appendonly: bool = False, timeout: float = 60.0
) -> RedisCluster:
    """Start ``masters`` cluster-enabled nodes under ``workdir/node-<port>``, join them with
    ``redis-cli --cluster create ... --cluster-replicas 0``, and wait until every node reports
    ``cluster_state:ok``."""
    if masters < 3:
        raise ServerError("a Redis Cluster needs at least 3 masters")
    workdir = Path(workdir)
    nodes: list[RedisServer] = []
    try:
        for _ in range(masters):
            port = _free_cluster_port()
            nodes.append(
                start_redis(
                    workdir / f"node-{port}",
                    port,
                    appendonly=appendonly,
                    extra_args=(
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "5000",
                    ),
                )
            )  # fmt: skip
        create = [
            find_binary("redis-cli"),
            "--cluster", "create",
            *(f"{HOST}:{node.port}" for node in nodes),
            "--cluster-replicas", "0",
            "--cluster-yes",
        ]  # fmt: skip
        result = subprocess.run(create, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise ServerError("redis-cli --cluster create failed:\n" + (result.stdout + result.stderr)[-2000:])
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            pending = [node for node in pending if not _cluster_ok(node.port)]
            if not pending:
                break
            if time.monotonic() > deadline:
                ports = ", ".join(str(node.port) for node in pending)
                raise ServerError(f"Redis Cluster not ok after {timeout:.0f}s on ports {ports}")
            time.sleep(0.1)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return RedisCluster(nodes=nodes)


def _cluster_ok(port: int) -> bool:
    try:
        return "cluster_state:ok" in _redis_command(port, "CLUSTER", "INFO")
    except (OSError, ServerError):
        return False


# --------------------------------------------------------------------------- PostgreSQL
