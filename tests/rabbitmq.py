"""A real RabbitMQ cluster with its MQTT plugin for tests: N nodes on loopback, started, stopped, killed, cleaned up.

Each node is Debian's RabbitMQ 3.10 (`rabbitmq-server`, installed by `make test`) run straight from
/usr/lib/rabbitmq/bin as the current user, in a folder of its own: its own node name, AMQP, distribution and
MQTT ports (all on 127.0.0.1, from `free_port`), one Erlang cookie for the cluster (in the nodes' `HOME`), and an
epmd of the cluster's own on a free port (`ERL_EPMD_PORT`; the nodes never start the machine's epmd), so
clusters of tests running beside each other never meet. The nodes boot in parallel and the others then join the
first (`rabbitmqctl join_cluster`): about 30 s for three nodes on this machine's two shared cores.

The cluster is configured as the README recommends ("What the cluster must guarantee"): three nodes, QoS 1
subscriptions of persistent sessions in quorum queues (`mqtt.durable_queue_type = quorum`), and the gateways' own
clean-session subscription queues mirrored (SINK_QUEUES). RabbitMQ 3.10 tracks MQTT client ids in a Raft cluster
across all nodes: with two nodes, one lost leaves the other without a majority, and a node restarted meanwhile
waits 100 s before its MQTT listener opens; quorum queues need a majority too. So a cluster that must survive the
loss of a node has three.

`stop` is graceful (SIGTERM: the node closes its connections and leaves its queues in order), `freeze` hangs the
node (SIGSTOP: what clients send it piles up unanswered), `kill` is SIGKILL of the node's Erlang VM (a crash or
power loss), `start` brings a node back on the same ports and data. Every process is its own session's leader
and is killed at the end of the test, or at exit for a test that never reached its teardown.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from hil.ports import free_port

SBIN = Path("/usr/lib/rabbitmq/bin")
MISSING = "rabbitmq-server is not installed: run `make test` once (it installs Debian's rabbitmq-server package)"
COOKIE = "FIELDGATE-TEST-CLUSTER-COOKIE"
#: The queues of gateways' sinks (client ids `fieldgate-<gateway.id>-<sink>`): a sink's clean session subscribes to
#: set/cmd with QoS 1, which RabbitMQ 3.10 gives a durable classic queue on the node the sink is on. When that node
#: dies, the queue's record stays, bound to the dead node, and the sink's SUBSCRIBE on any other node is refused (the
#: connection closed) until the node returns, unless the queue is mirrored (MIRRORED) and a mirror takes over.
SINK_QUEUES = "^mqtt-subscription-fieldgate-"
#: Classic mirroring on every node, a mirror promoted when the queue's node dies or stops.
MIRRORED = '{"ha-mode": "all", "ha-promote-on-failure": "always", "ha-promote-on-shutdown": "always"}'


class RabbitError(RuntimeError):
    """RabbitMQ is missing, a node would not start, or a cluster command failed."""


def find_rabbitmq() -> Path:
    """The folder of RabbitMQ's own scripts (not Debian's wrappers, which switch user); RabbitError if missing."""
    if not (SBIN / "rabbitmq-server").exists() or shutil.which("epmd") is None:
        raise RabbitError(MISSING)
    return SBIN


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


_live: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    # A node must not outlive the test run, even one whose fixture never reached its teardown.
    for proc in list(_live):
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process and everything in its session (the VM's port programs), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _live.discard(proc)


def _spawn(argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    out: IO[bytes]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    _live.add(proc)
    return proc


class RabbitNode:
    """One RabbitMQ node of a test cluster: `name@localhost`, its ports, folder, log and process."""

    def __init__(self, cluster: RabbitCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.node = f"{name}@localhost"
        self.dir = cluster.workdir / name
        self.amqp_port, self.dist_port, self.mqtt_port = free_port(), free_port(), free_port()
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        (self.dir / "log").mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}",
                    f"mqtt.listeners.tcp.1 = 127.0.0.1:{self.mqtt_port}",
                    "mqtt.allow_anonymous = true",
                    "loopback_users = none",
                    # Persistent sessions' QoS 1 queues replicated on every node, kept while a majority lives.
                    "mqtt.durable_queue_type = quorum",
                    "log.console = false",
                    "log.file.level = info",
                ]
            )
            + "\n"
        )
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")

    @property
    def url(self) -> str:
        """The node's MQTT listener as a sink's `url`/`urls` takes it."""
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        """Whether the node's VM is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log(self) -> Path:
        """The node's own log file."""
        return self.dir / "log" / f"{self.node}.log"

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the node's log (and of what its VM wrote to stdout)."""
        text = []
        for path in (self.dir / "out.log", self.log):
            with contextlib.suppress(FileNotFoundError):
                text += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text) or "(no log)"

    def env(self) -> dict[str, str]:
        """The environment the node and the CLI tools aimed at it run with."""
        vm = "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}"
        return {
            **self.cluster.env(),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            # The scripts exec the VM instead of waiting on it: our child is the VM, so kill is a real SIGKILL of it.
            "RABBITMQ_ALLOW_INPUT": "1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"-noinput {vm}",
            # No scheduler busy-waiting: the machine's cores are shared with the gateway and the other tests.
            "RABBITMQ_SCHEDULER_BUSY_WAIT_THRESHOLD": "none",
        }

    def spawn(self) -> None:
        """Start the node's VM (returns at once; `wait_ready` waits for its MQTT listener)."""
        if self.running:
            return
        if _accepts(self.mqtt_port):
            raise RabbitError(f"port {self.mqtt_port} is already taken by another listener")
        self.starts += 1
        with (self.dir / "out.log").open("ab") as out:
            out.write(f"--- start {self.starts} ---\n".encode())
        self._proc = _spawn([str(self.cluster.sbin / "rabbitmq-server")], self.env(), self.dir / "out.log", self.dir)

    def wait_ready(self, timeout: float) -> None:
        """Return once the node's MQTT listener accepts connections (the plugin starts last); RabbitError if not."""
        deadline = time.monotonic() + timeout
        while not _accepts(self.mqtt_port):
            if not self.running:
                raise RabbitError(f"{self.node} exited on start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RabbitError(f"{self.node}: no MQTT listener after {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def start(self, timeout: float = 120.0) -> None:
        """Start the node (again) and wait until it takes MQTT connections."""
        self.spawn()
        self.wait_ready(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop gracefully (SIGTERM, which RabbitMQ takes as `rabbitmqctl stop`); SIGKILL if it takes too long."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(self._proc)  # whatever the VM left (port programs) goes with it
        self._proc = None

    def freeze(self) -> None:
        """SIGSTOP the node's VM: it hangs, its clients' data piles up in its sockets unanswered (no PUBACK)."""
        if self.running and self._proc is not None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL the node's VM: no goodbye to its clients or its peers, as a crash or a power cut."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, signal.SIGKILL)
        _kill_group(self._proc)
        self._proc = None

    def ctl(self, *args: str, timeout: float = 120.0) -> str:
        """`rabbitmqctl -n NODE ARGS`; its output, RabbitError if it fails."""
        done = subprocess.run(
            [str(self.cluster.sbin / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env() | {"RABBITMQ_CTL_ERL_ARGS": "-start_epmd false"},
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RabbitError(f"rabbitmqctl {' '.join(args)} on {self.node}: {done.stdout}{done.stderr}")
        return done.stdout

    def __repr__(self) -> str:
        return f"RabbitNode({self.node}, {self.url}, {'running' if self.running else 'stopped'})"


class RabbitCluster:
    """`size` RabbitMQ nodes clustered on loopback in `workdir`; `start` boots and joins them, `close` ends all."""

    def __init__(self, workdir: Path, size: int = 3, *, mirror: str | None = SINK_QUEUES) -> None:
        self.sbin = find_rabbitmq()
        self.mirror = mirror  # a regex of queue names to mirror (MIRRORED); None: no policy
        self.workdir = workdir
        self.home = workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(COOKIE)
        cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        self.epmd_port = free_port()
        self._epmd: subprocess.Popen[bytes] | None = None
        self.nodes = [RabbitNode(self, f"fg{i + 1}") for i in range(size)]
        self.boot_seconds = 0.0

    def env(self) -> dict[str, str]:
        """What every node and CLI call of this cluster shares: the cookie's home and the cluster's epmd."""
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
        return keep | {
            "HOME": str(self.home),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONF_ENV_FILE": "/dev/null",  # not the machine's /etc/rabbitmq/rabbitmq-env.conf
        }

    def start(self, timeout: float = 120.0) -> None:
        """Start epmd and every node in parallel, then join the others to the first; `boot_seconds` says how long."""
        began = time.monotonic()
        epmd = shutil.which("epmd") or "epmd"
        self._epmd = _spawn([epmd, "-port", str(self.epmd_port)], self.env(), self.workdir / "epmd.log", self.workdir)
        deadline = time.monotonic() + 10
        while not _accepts(self.epmd_port):
            if self._epmd.poll() is not None or time.monotonic() > deadline:
                raise RabbitError(f"epmd did not listen on {self.epmd_port}")
            time.sleep(0.02)
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.wait_ready(timeout)
        # Joined one by one after all booted: nodes that find each other while booting (peer discovery) can
        # hang in the feature flags' sync here.
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")
        joined = self.running_nodes(self.nodes[0])
        if joined != sorted(n.node for n in self.nodes):
            raise RabbitError(f"the nodes did not form one cluster: {self.nodes[0].node} sees {joined}")
        if self.mirror is not None:
            first.ctl("set_policy", "--apply-to", "queues", "mirrored-sink-queues", self.mirror, MIRRORED)
        self.boot_seconds = time.monotonic() - began

    def running_nodes(self, via: RabbitNode) -> list[str]:
        """The cluster's running nodes as `via` sees them."""
        out = via.ctl("eval", "rabbit_nodes:all_running().")
        return sorted(n.strip(" '") for n in out.strip().strip("[]").split(",") if n.strip())

    def close(self) -> None:
        """Kill every node and the cluster's epmd (a test's end needs no graceful goodbye)."""
        for node in self.nodes:
            node.kill()
        if self._epmd is not None:
            _kill_group(self._epmd)
            self._epmd = None

    def __enter__(self) -> RabbitCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def rabbit_cluster(workdir: Path, size: int = 3, *, mirror: str | None = SINK_QUEUES) -> Iterator[RabbitCluster]:
    """A started cluster of `size` nodes in `workdir`, closed at the end whatever happened."""
    with RabbitCluster(workdir, size, mirror=mirror) as cluster:
        yield cluster
