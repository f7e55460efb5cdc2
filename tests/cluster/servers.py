"""A real Redis Cluster for the tests: N masters, no replicas, on free loopback ports.

Each node is a ``tests.support.servers.RedisServer`` (its own directory, port and log) started with
``--cluster-enabled yes``; ``redis-cli --cluster create`` then assigns the 16,384 slots and the
fixture waits until every node reports ``cluster_state:ok`` and agrees on the slot map. Nodes can
be killed (SIGKILL) and restarted in place: a restarted node reads its ``nodes.conf`` and rejoins
with its slots, and with ``appendonly`` it reloads its AOF, whose tail the durability test cuts.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support.servers import RedisServer, free_port

# Short enough that a killed node is noticed quickly, long enough that a loaded 2-core machine
# does not fail a node over for being slow.
NODE_TIMEOUT_MS = 3000


def redis_cli_bin() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        raise RuntimeError("redis-cli is not installed; `make test` installs redis (apt-get)")
    return path


@dataclass
class RedisClusterServers:
    masters: int = 3
    appendonly: bool = False
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Any node will do: the client discovers the rest with CLUSTER SLOTS."""
        return self.nodes[0].url

    def _node(self) -> RedisServer:
        node = RedisServer(appendonly=self.appendonly)
        node.extra_args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(node.directory / "nodes.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # The bus port defaults to port + 10000, which a free port above 55535 cannot have.
            "--cluster-port", str(free_port()),
        ]
        if self.appendonly:
            # Written and synced before each reply. Under ``everysec`` Redis may postpone the
            # write itself for up to 2 s while a background fsync runs, and still answer: the
            # durability test's cut, taken once the store says round 1 is in, then missed round
            # 1's own records (seen twice in this session as [None, None] on a loaded machine).
            node.extra_args += ["--appendfsync", "always"]
        return node

    def start(self) -> RedisClusterServers:
        self.nodes = [self._node() for _ in range(self.masters)]
        try:
            for node in self.nodes:
                node.start()
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            out = subprocess.run(
                [redis_cli_bin(), "--cluster", "create", *addrs,
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=60, check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}{out.stderr}")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every node says cluster_state:ok and all see the same, complete slot map."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                maps = []
                for node in self.nodes:
                    with redis.Redis(port=node.port, socket_timeout=2) as c:
                        state = c.execute_command("CLUSTER INFO").get("cluster_state")
                        if state != "ok":
                            raise RuntimeError(f"node {node.port}: cluster_state {state}")
                        slots = c.execute_command("CLUSTER SLOTS")
                        maps.append(sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in slots))
                covered = sum(e - s + 1 for s, e, _ in maps[0])
                if all(m == maps[0] for m in maps) and covered == 16384:
                    return
                last = f"slot maps differ: {maps}"
            except (redis.exceptions.RedisError, RuntimeError) as err:
                last = str(err)
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis Cluster not ok after {timeout}s: {last}")
            time.sleep(0.1)

    def node_of_slot(self, slot: int) -> RedisServer:
        with redis.Redis(port=self.nodes[0].port) as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"slot {slot} is not served")

    def kill(self, node: RedisServer) -> None:
        node.kill()

    def restart(self, node: RedisServer) -> None:
        """Start a (killed) node again in place and wait until the cluster is whole."""
        node.stop()
        node.start()
        self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def cleanup(self) -> None:
        self.stop()
        for node in self.nodes:
            shutil.rmtree(node.directory, ignore_errors=True)


def last_incr_aof(node: RedisServer) -> Path:
    """The AOF file a Redis 7 node is appending to (the newest ``*.incr.aof``)."""
    files = sorted(
        (node.directory / "appendonlydir").glob("*.incr.aof"),
        key=lambda p: int(p.name.split(".")[-3]),
    )
    if not files:
        raise FileNotFoundError(f"no incremental AOF under {node.directory}")
    return files[-1]
