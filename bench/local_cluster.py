"""A local multi-node Ray cluster shaped like a KubeRay one, on loopback: a head that runs no work
(`ray start --head --num-cpus 0`) and worker nodes of one CPU each, named by a custom resource.
A node is lost by SIGKILLing its raylet, as when a spot VM vanishes, and comes back with a new
`ray start`. Used by tests/integration/test_elastic.py and bench/elastic.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`ray start --head --num-cpus 0` and worker nodes named by a custom resource, on loopback."""

    def __init__(self, env: dict | None = None):
        self.port, self.dash = free_port(), free_port()
        # A temp dir per node, as separate machines have: nodes that share one also share their
        # runtime-env folders, and one node's agent replaced the job's working dir under another's
        # driver (ModuleNotFoundError mid-import), and every log line came once per node.
        self.temps: list[str] = []
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        # A node whose raylet is gone is declared dead after 3 missed 1-s health checks (default 5 x 3 s).
        self.env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
        # (How long a restart waits for a size it cannot place is the run's own setting:
        # scaling.worker_group_start_timeout_s.)
        self.env.pop("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", None)
        self.env.update(env or {})

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode and args[0] not in ("stop", "job"):
            raise RuntimeError(f"ray {' '.join(args)}: {r.stderr[-2000:]}")
        return r

    def start(self, *nodes: str) -> None:
        self.ray(
            "start",
            "--head",
            f"--temp-dir={self._temp('head')}",
            f"--port={self.port}",
            "--num-cpus=0",  # as large KubeRay clusters start the head: no task lands there
            "--include-dashboard=true",
            f"--dashboard-port={self.dash}",
            "--node-ip-address=127.0.0.1",
        )
        for name in nodes:
            self.add(name)

    def add(self, name: str) -> None:
        self.ray(
            "start",
            f"--address=127.0.0.1:{self.port}",
            f"--temp-dir={self._temp(name)}",
            "--num-cpus=1",
            f"--resources={json.dumps({name: 1})}",
            "--node-ip-address=127.0.0.1",
        )

    def _temp(self, name: str) -> str:
        self.temps.append(tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp"))  # (short: socket paths)
        return self.temps[-1]

    def raylet_pid(self, name: str) -> int:
        """The raylet of the node that offers resource `name` (its command line names it)."""
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"/raylet") and any(name.encode() in a for a in argv):
                return int(proc.name)
        raise RuntimeError(f"no raylet offers {name}")

    def lose(self, name: str) -> None:
        """The node vanishes, as a VM does: its raylet and every process it started (training
        workers mid-step or mid-upload, agents) SIGKILLed at once. (A worker whose raylet alone
        is killed lives on for a few steps; a vanished VM's do not.)"""
        raylet = self.raylet_pid(name)
        for pid in [raylet, *_descendants(raylet)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def submit(self, config: Path) -> subprocess.Popen:
        """`ray job submit` (which follows the job's log until it ends), retried until the head's job
        agent is up (some seconds after `ray start` returns)."""
        for _ in range(30):
            r = self.ray("job", "list", f"--address=http://127.0.0.1:{self.dash}", timeout=60)
            if r.returncode == 0:
                break
            time.sleep(2)
        args = [RAY, "job", "submit", f"--address=http://127.0.0.1:{self.dash}", f"--working-dir={ROOT}", "--"]
        args += [sys.executable, "jobs/distill.py", "--config", str(config)]
        return subprocess.Popen(args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> None:
        self.ray("stop", "--force")
        for temp in self.temps:
            shutil.rmtree(temp, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: each process's parent is field 4 of its stat)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
