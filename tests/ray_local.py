"""A real Ray cluster on localhost for tests: `ray start --head --block` (+ `ray start --address --block` per extra
node), each with its own temp dir and free ports, in an environment WITHOUT the stage's variables (as a cluster
someone else started). Stopped by signalling the process groups the test started (never a global `ray stop`); Ray
writes the cluster's address into the test's own temp dir, so /tmp/ray/ray_current_cluster -- where another
process's plain `ray.init()` would look -- is left untouched. (tests/ is on sys.path: tests/conftest.py's folder.)
"""

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
from contextlib import contextmanager
from pathlib import Path

DEFAULT_ADDRESS_FILE = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _ray_bin() -> str:
    cand = Path(sys.executable).parent / "ray"
    return str(cand if cand.exists() else shutil.which("ray"))


def our_processes(marker: str) -> list[int]:
    """PIDs whose command line mentions `marker` (a cluster's temp dir: its raylets, GCS, workers)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and int(p.name) != os.getpid():
            pids.append(int(p.name))
    return pids


def _node_ports() -> list[str]:
    """The ports of one node that Ray would otherwise take from fixed defaults (the dashboard agent's 52365) or that
    the test names: free now, chosen in one call so no two coincide. Workers bind ports the OS picks
    (`--min/max-worker-port=0`, as ray.cluster_utils does): a fixed worker range of one node could hold a port
    another node's raylet picked, and that node then never joins (CI, 2026-12-05: "has not 2 alive nodes: 1")."""
    nm, om, agent, agent_grpc, metrics, rtenv = _free_ports(6)
    return [f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={rtenv}", "--min-worker-port=0", "--max-worker-port=0"]  # fmt: skip


@contextmanager
def local_ray_cluster(num_cpus: int = 16, num_gpus: int = 1, worker_nodes: int = 0):
    """A head node (+ `worker_nodes` more nodes, each with `num_cpus` / `num_gpus` logical resources) on 127.0.0.1;
    yields (GCS address, temp dir)."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    gcs, client = _free_ports(2)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VERL_", "EKSFT_", "RAY_ADDRESS")) and k not in ("PYTHONPATH", "CUDA_VISIBLE_DEVICES")}  # fmt: skip
    # Ray >= 2.5x: `ray start` turns token auth on when ~/.ray/auth_token exists (any earlier local ray.init() writes
    # one), and a driver then needs RAY_AUTH_MODE=token; the test's cluster is explicit instead
    env["RAY_AUTH_MODE"] = "disabled"
    common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
              "--disable-usage-stats"]
    head = [_ray_bin(), "start", "--head", *common, f"--port={gcs}", f"--temp-dir={temp}", "--include-dashboard=false",
            f"--ray-client-server-port={client}", *_node_ports()]  # fmt: skip
    procs, logs = [], []

    def start(cmd, name):
        log = open(temp / f"{name}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start(head, "ray_start_head")
        deadline = time.time() + 120
        addr_file = temp / "ray_current_cluster"
        while not (addr_file.exists() and addr_file.read_text().strip()):
            if procs[0].poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed (exit {procs[0].poll()}):\n"
                                   f"{(temp / 'ray_start_head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        address = addr_file.read_text().strip()  # Ray canonicalises the node's address to the host's IP
        assert address.endswith(f":{gcs}"), address
        nodes = {}  # worker node -> (its `ray start` process, its node-manager port)
        for attempt in range(2):  # a node that has not joined is started once more, on other ports
            alive = _alive_node_ports(address, env) if nodes else []
            for i in range(worker_nodes):
                if i in nodes and nodes[i][1] in alive:
                    continue
                if i in nodes:
                    _stop_group(nodes[i][0])
                ports = _node_ports()
                start([_ray_bin(), "start", f"--address={address}", *common, f"--temp-dir={temp}", *ports],
                      f"ray_start_node{i + 1}_try{attempt + 1}")
                nodes[i] = (procs[-1], int(ports[0].split("=")[1]))
            if not nodes or _wait_for_nodes(address, [p for _, p in nodes.values()], env, timeout=90 if attempt else 60):
                break
        else:
            raise RuntimeError(f"the Ray cluster at {address} has not {1 + worker_nodes} alive nodes after two starts "
                               f"of its worker nodes (alive node-manager ports {_alive_node_ports(address, env)}):\n"
                               f"{_diagnostics(temp)}")
        yield address, temp
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` shuts its own processes down on SIGTERM
                proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for pid in our_processes(str(temp)):  # anything of this cluster still alive: by pid, never by name
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in procs:
            _stop_group(proc)
        for log in logs:
            log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _alive_node_ports(address: str, env: dict) -> list[int]:
    """Node-manager ports of the cluster's alive nodes, asked from a fresh driver process ([] if it cannot connect)."""
    code = ("import json,ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(json.dumps([x['NodeManagerPort'] for x in ray.nodes() if x['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return []
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wait_for_nodes(address: str, ports: list[int], env: dict, timeout: float) -> bool:
    """Whether the worker nodes of these node-manager ports are all alive within `timeout` seconds."""
    deadline = time.time() + timeout
    while not set(ports) <= set(_alive_node_ports(address, env)):
        if time.time() > deadline:
            return False
        time.sleep(2)
    return True


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _diagnostics(temp: Path) -> str:
    """The tails of every `ray start` log and of the nodes' raylet/GCS error logs under the cluster's temp dir."""
    parts = []
    for f in sorted(temp.glob("ray_start_*.log")) + sorted(temp.glob("session_2*/logs/*.err")):
        tail = f.read_text(errors="replace")[-1500:].strip()
        if tail:
            parts.append(f"--- {f.relative_to(temp)}\n{tail}")
    return "\n".join(parts) or "(no log output)"


def cluster_resources(address: str) -> dict:
    """(total, available) resources of the cluster at `address`, asked from a fresh driver process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    code = ("import json,ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(json.dumps([ray.cluster_resources(), ray.available_resources()]))")
    out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True, check=True)
    total, avail = json.loads(out.stdout.strip().splitlines()[-1])
    return {"total": total, "available": avail}
