"""A ``modloc serve`` in a subprocess, started and stopped from Python: what the demo, the
service benchmark and the server tests use.

::

    server = ServerProcess.start(artifacts, "--state-dir", str(tmp / "state"))
    ... grpc.insecure_channel(server.address) ...
    assert server.stop() == 0          # SIGTERM: drain, exit status
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY_PREFIX = "listening on "


@contextlib.contextmanager
def held_port(port: int = 0, host: str = "127.0.0.1"):
    """A TCP port no other program can take while the block runs, for ``modloc serve
    --processes N`` (N > 1), which needs a named port.

    The holder is a socket bound with SO_REUSEPORT that never listens: the serving processes
    (gRPC sets SO_REUSEPORT when there are several) bind the port beside it and get every
    connection, while a program without SO_REUSEPORT is refused. Unlike probing for a free
    port and binding it later, no other program can take the port in between. (A single
    process binds without SO_REUSEPORT, on purpose: it cannot share a held port.)
    """
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, port))
        yield holder.getsockname()[1]


class ServerProcess:
    """A ``modloc serve`` subprocess; ``address`` is what it printed once serving."""

    def __init__(self, process: subprocess.Popen, address: str, log_path: Path):
        self.process = process
        self.address = address
        self.log_path = log_path

    @classmethod
    def start(cls, artifacts, *args: str, file_size_limit: int | None = None) -> ServerProcess:
        """Run ``modloc serve ARTIFACTS --address 127.0.0.1:0 ARGS`` and wait until it
        prints its address; raises RuntimeError with its log when it exits first.

        ``file_size_limit``: the largest file the server may write, in bytes (RLIMIT_FSIZE;
        past it a write fails with EFBIG, as on a full disk).
        """
        log_path = Path(tempfile.mkstemp(prefix="modloc-serve-", suffix=".log")[1])
        address_args = () if any(a == "--address" for a in args) else ("--address", "127.0.0.1:0")
        process = subprocess.Popen(
            [sys.executable, "-m", "modloc", "serve", str(artifacts), *address_args, *args],
            stdout=subprocess.PIPE, stderr=open(log_path, "wb"), text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=None if file_size_limit is None else lambda: resource.setrlimit(
                resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit)))
        line = process.stdout.readline()  # blocks until the address or EOF (the server died)
        if not line.startswith(READY_PREFIX):
            process.kill()
            process.wait()
            raise RuntimeError(f"modloc serve did not start (status {process.returncode}):\n"
                               f"{line}{log_path.read_text()}")
        return cls(process, line[len(READY_PREFIX):].strip(), log_path)

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def log(self) -> str:
        return self.log_path.read_text()

    def health(self, service: str = "", timeout: float = 5.0) -> int:
        """The health status of ``service`` (``HealthCheckResponse.SERVING`` = 1, …)."""
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``signum`` and wait; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        finally:
            self.process.stdout.close()

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)
