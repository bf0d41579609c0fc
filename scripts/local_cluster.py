"""A cluster on one machine, as fallopt's tests and demos build it: `mlflow server` with its
artifacts served over HTTP, and Ray nodes that share no files.

Each Ray node is a `ray start --block` in a process group of its own, started in a directory
of its own with a `FALLOPT_CACHE` of its own (Ray's workers inherit both from their node), so
two nodes on one machine share nothing but what goes through the tracking server, as on a
real cluster. Killing a node's process group kills its raylet and its workers at once, as a
machine that dies; `ray stop` is not used, since it stops every node of the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

START_SECONDS = 120


def free_port() -> int:
    """A TCP port nothing listens on now."""
    return free_ports(1)[0]


def _wait(until: callable, what: str, log: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + START_SECONDS
    while not until():
        if proc.poll() is not None or time.time() > deadline:
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"{what} did not start:\n{tail}")
        time.sleep(0.3)


@contextmanager
def mlflow_server(
    backend: str, root: Path, workers: int = 2, port: int | None = None
) -> Iterator[str]:
    """`mlflow server` on loopback, artifacts served from `root`; yields its URI.

    `backend` is a backend store URI: `postgresql://...` or `sqlite:///...`; `port` a free
    one unless given (a server restarted where it was).
    """
    root.mkdir(parents=True, exist_ok=True)
    port, log = port or free_port(), root / "mlflow-server.log"
    uri = f"http://127.0.0.1:{port}"
    with log.open("a") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", backend, "--workers", str(workers), "--serve-artifacts",
             "--artifacts-destination", str(root / "server-artifacts")],
            stdout=subprocess.DEVNULL, stderr=out, start_new_session=True,
        )  # fmt: skip

    def healthy() -> bool:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            return True
        except OSError:
            return False

    try:
        _wait(healthy, "mlflow server", log, server)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


@contextmanager
def postgres_database(admin: str) -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards; yields its URI.

    `admin` is a URI of a role that may create databases, e.g.
    postgresql://fallopt:fallopt@127.0.0.1:5432/postgres
    """
    import psycopg

    name = f"fallopt_{uuid.uuid4().hex[:8]}"
    conn = psycopg.connect(admin, autocommit=True)
    conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{admin.rsplit('/', 1)[0]}/{name}"
    finally:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports nothing listens on now (held open together while chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def ray_auth(token: str) -> dict[str, str]:
    """The environment that lets a process into a cluster with token authentication.

    Ray 2.60 turns token authentication on by itself once `~/.ray/auth_token` exists; a
    cluster's nodes, its drivers and its workers must then all hold the same token.
    """
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


class RayNode:
    """One Ray node on this machine: its own directory, cache, ports and process group."""

    def __init__(
        self, name: str, root: Path, ray_dir: Path, token: str, head: str | None = None
    ) -> None:
        self.name, self.dir, self.ray_dir, self.token = name, root / name, ray_dir, token
        self.head = head  # the head's `host:port`; None: this node is the head
        self.port, *self._ports = free_ports(8)
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """The cluster's address, as a driver or another node gives it."""
        return self.head or f"127.0.0.1:{self.port}"

    def start(self) -> RayNode:
        """`ray start --block` in this node's directory; returns once the node is up."""
        self.dir.mkdir(parents=True, exist_ok=True)
        ports = iter(self._ports)
        args = ["ray", "start", "--block", "--num-cpus=1", "--disable-usage-stats",
                f"--temp-dir={self.ray_dir}", f"--resources={{\"{self.name}\": 1}}",
                f"--node-manager-port={next(ports)}", f"--object-manager-port={next(ports)}",
                f"--dashboard-agent-listen-port={next(ports)}",
                f"--dashboard-agent-grpc-port={next(ports)}",
                f"--metrics-export-port={next(ports)}",
                f"--runtime-env-agent-port={next(ports)}"]  # fmt: skip
        if self.head is None:
            args += ["--head", f"--port={self.port}", "--include-dashboard=false",
                     f"--ray-client-server-port={next(ports)}"]  # fmt: skip
        else:
            args += [f"--address={self.head}"]
        # PYTHONPATH: the node's workers import this checkout's fallopt, installed or not.
        env = {**os.environ, "FALLOPT_CACHE": str(self.dir / "cache"), **ray_auth(self.token),
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "PYTHONPATH": str(REPO)}  # fmt: skip
        env.pop("RAY_ADDRESS", None)
        log = self.dir / "ray-node.log"
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                args, cwd=self.dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        proc = self.proc
        started = lambda: "Ray runtime started" in log.read_text()  # noqa: E731
        _wait(started, f"Ray node {self.name}", log, proc)
        return self

    def kill(self) -> None:
        """SIGKILL the node's raylet and workers at once, as a machine that dies."""
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP every process of the node: it holds still, as a machine that hangs."""
        self._signal_tree(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_tree(signal.SIGCONT)

    def _signal_tree(self, sig: int) -> None:
        # The tree, not the group: Ray's workers need not share the node's process group.
        _send(_tree(self.proc.pid), sig)

    def stop(self) -> None:
        """Stop the node: its `ray start --block` ends its raylet and workers."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        tree = _tree(self.proc.pid)
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        # SIGKILL reaches a frozen process; other signals wait for SIGCONT (see `pause`).
        _send(tree, sig if sig == signal.SIGKILL else signal.SIGCONT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            _send(_tree(self.proc.pid), signal.SIGKILL)
            self.proc.wait(10)
        deadline = time.time() + 30
        while _group_alive(self.proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        if _group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:  # gone meanwhile
            continue
        ppid = int(rest.rsplit(") ", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(pid))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _send(pids: list[int], sig: int) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def ray_cluster(root: Path, workers: int = 1) -> Iterator[list[RayNode]]:
    """A head and `workers` worker nodes under `root`; all stopped on the way out.

    The cluster has a token of its own: a driver joins it with `ray_auth(nodes[0].token)`.
    """
    ray_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # sockets: at most 107 bytes
    token = uuid.uuid4().hex
    nodes = [RayNode("head", root, ray_dir, token)]
    try:
        nodes[0].start()
        for i in range(workers):
            worker = RayNode(f"worker{i + 1}", root, ray_dir, token, nodes[0].address)
            nodes.append(worker.start())
        yield nodes
    finally:
        with ExitStack() as stopping:  # every node, even if one fails to stop
            for node in nodes:
                stopping.callback(node.stop)
        shutil.rmtree(ray_dir, ignore_errors=True)
