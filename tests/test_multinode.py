"""A search on a real two-node Ray cluster started with `ray start` on this machine.

Each node has 2 CPUs and a trial asks for 2 workers x 2 CPUs, so no node can hold a whole trial:
Train V2's placement group (strategy PACK, which spreads when one node is too small) has to put
one worker on each node, and the workers train together over gloo. The test checks that every
trial reported both nodes' ids (`node_ids`, see prado_dist/distributed/worker.py), that the
decoded cache was built once, by the search driver, and reused by every worker on both nodes, and
that stopping the cluster leaves no process behind. Before that, a driver whose images are not
node_b's is refused with exit 2 naming node_b (prado_dist/distributed/node_data.py).

Isolation from other Ray instances on the machine: a private temp dir, free ports for every
service of both nodes, and a private auth token (Ray 2.60 turns token authentication on for
`ray start --head` when ~/.ray/auth_token exists; a second node or driver without the token is
refused). `ray stop` is not used: it stops every Ray process of the user on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from prado_dist.data.demo import DEMO_VERSION, make_demo_dataset
from tests.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))
CPUS_PER_NODE = 2
WORKER_PORTS_PER_NODE = 100  # Ray worker processes of one node; a trial needs fewer than 20


@dataclass
class LocalCluster:
    address: str
    temp_dir: str
    env: dict[str, str]
    process_groups: list[int] = field(default_factory=list)  # one per `ray start`: its daemons


def free_port_range(count: int) -> int:
    """First port of `count` consecutive free ports, below the usual ephemeral range (32768+)."""
    for _ in range(200):
        first = random.randrange(20000, 32000 - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    probe = stack.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports found")


def node_ports() -> list[str]:
    """Ports that every node binds, chosen free so that no other Ray on this machine is in the way."""
    first_worker_port = free_port_range(WORKER_PORTS_PER_NODE)
    return [
        *("--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())),
        *("--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port())),
        *("--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())),
        *("--min-worker-port", str(first_worker_port)),
        *("--max-worker-port", str(first_worker_port + WORKER_PORTS_PER_NODE - 1)),
    ]


def ray_start(cluster: LocalCluster, *args: str) -> None:
    """`ray start` in its own session: the daemons it leaves running share its process group."""
    process = subprocess.Popen(
        [RAY, "start", *args, "--temp-dir", cluster.temp_dir, "--num-cpus", str(CPUS_PER_NODE)]
        + ["--object-store-memory", str(200 * 1024**2), "--disable-usage-stats", *node_ports()],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    cluster.process_groups.append(process.pid)
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    assert process.returncode == 0, f"ray start {' '.join(args)} failed:\n{output[-3000:]}"


def processes_of(temp_dir: str) -> list[int]:
    """Processes that belong to the cluster: its temp dir in their command line or environment.

    Ray names its workers and agents `ray::...`, hiding their arguments, but they inherit the
    raylet's environment, which holds RAY_TMPDIR.
    """
    marker = f"RAY_TMPDIR={temp_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().split(") ")[-1].startswith("Z"):
                continue  # a zombie holds nothing; its parent reaps it
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if temp_dir.encode() in cmdline or marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def stop_cluster(cluster: LocalCluster, grace_s: float = 5.0) -> None:
    """SIGTERM the process groups of both nodes, SIGKILL what is left after `grace_s`.

    The raylets and agents exit on SIGTERM within a second; gcs_server and the autoscaler monitor
    were still running 15 s later (measured), so they get SIGKILL.
    """
    for group in cluster.process_groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while processes_of(cluster.temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    for group in cluster.process_groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    for pid in processes_of(cluster.temp_dir):  # anything that left its group (none seen so far)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes_of(cluster.temp_dir) and time.monotonic() < deadline:
        time.sleep(0.2)


@contextlib.contextmanager
def two_node_cluster(cache_dir: Path) -> Iterator[LocalCluster]:
    """Head (resource node_a) + second node (node_b), 2 CPUs each, stopped and removed afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: socket paths must fit 107 bytes
    env = {
        **os.environ,
        "RAY_TMPDIR": temp_dir,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PRADO_DIST_CACHE": str(cache_dir),  # inherited by every Ray worker through its raylet
        "PYTHONUNBUFFERED": "1",
    }
    cluster = LocalCluster(address=f"127.0.0.1:{free_port()}", temp_dir=temp_dir, env=env)
    try:
        port = cluster.address.rsplit(":", 1)[1]
        ray_start(
            cluster,
            *("--head", "--node-ip-address", "127.0.0.1", "--port", port, "--resources", '{"node_a": 1}'),
            *("--include-dashboard=false", "--dashboard-port", str(free_port())),
        )
        ray_start(
            cluster, "--address", cluster.address, "--node-ip-address", "127.0.0.1", "--resources", '{"node_b": 1}'
        )
        yield cluster
    finally:
        stop_cluster(cluster)
        shutil.rmtree(temp_dir, ignore_errors=True)


def nodes_of(cluster: LocalCluster) -> list[dict]:
    """Every node the cluster has had (alive or not): id, alive, resources; from `ray.nodes()` in a
    short-lived driver, so that the test process itself never connects to the cluster."""
    script = (
        "import json, ray\n"
        f"ray.init(address={cluster.address!r}, log_to_driver=False)\n"
        "print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], 'resources': n['Resources']} "
        "for n in ray.nodes()]))\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def node_ids_by_resource(cluster: LocalCluster) -> dict[str, str]:
    """{"node_a": id, "node_b": id} of the live nodes."""
    return {
        name: node["id"]
        for node in nodes_of(cluster)
        if node["alive"]
        for name in node["resources"]
        if name.startswith("node_")
    }


def run_tune(cluster: LocalCluster, args: list[str], timeout_s: float) -> tuple[int, str]:
    """`python -m prado_dist.tune ARGS` as a driver of the cluster; its process group killed on timeout."""
    process = subprocess.Popen(
        [sys.executable, "-m", "prado_dist.tune", *args],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\n[killed after {timeout_s} s]"
    return process.returncode, output


def refused_when_a_node_has_other_images(cluster: LocalCluster, small_demo: Path, tmp_path: Path, node: str) -> None:
    """A search whose driver's demo set is not the one node_b finds is refused before it starts.

    Both nodes share this machine's disk, so the driver is given another cache folder (its demo set
    is `small_demo`), while the nodes' cache holds a different demo set of 30 images."""
    demo_name = f"demo-{DEMO_VERSION}-600-0"  # what demo_data_dir() looks for in a cache folder
    driver_cache = tmp_path / "driver-cache"
    driver_cache.mkdir()
    (driver_cache / demo_name).symlink_to(small_demo)
    nodes_demo = Path(cluster.env["PRADO_DIST_CACHE"]) / demo_name
    nodes_demo.parent.mkdir(parents=True, exist_ok=True)
    nodes_demo.symlink_to(make_demo_dataset(tmp_path / "other-demo", images=30, seed=2, size=32))
    driver = replace(cluster, env={**cluster.env, "PRADO_DIST_CACHE": str(driver_cache)})
    try:
        code, output = run_tune(
            driver,
            [
                *("--space", "demo", "--address", cluster.address, "--storage", str(tmp_path / "refused")),
                *("--mlflow-uri", f"sqlite:///{tmp_path}/refused.db", "--set", "epochs=1", "--set", "image_size=32"),
            ],
            timeout_s=300,
        )
    finally:
        nodes_demo.unlink()
    assert code == 2, output[-3000:]
    assert f"({node[:8]}): other files" in output and "same files at the same path" in output, output[-3000:]
    assert "parent run" not in output  # refused before the search's MLflow run was opened


def test_search_trials_span_two_nodes(small_demo: Path, tmp_path: Path) -> None:
    storage, cache_dir = tmp_path / "runs", tmp_path / "cache"
    with two_node_cluster(cache_dir) as cluster:
        nodes = node_ids_by_resource(cluster)
        assert sorted(nodes) == ["node_a", "node_b"] and nodes["node_a"] != nodes["node_b"]
        refused_when_a_node_has_other_images(cluster, small_demo, tmp_path, nodes["node_b"])
        code, output = run_tune(
            cluster,
            [
                *("--space", "demo", "--address", cluster.address, "--data", str(small_demo)),
                *("--storage", str(storage), "--name", "multinode", "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db"),
                *("--workers-per-trial", "2", "--cpus-per-worker", "2", "--num-samples", "2"),
                *("--set", "epochs=1", "--set", "image_size=32"),
            ],
            timeout_s=450,  # measured: 4.6 min with 2 cores shared at load average ~15
        )
        assert code == 0, output[-5000:]
        assert "=== Search finished ===" in output
        assert "The images are the same on the 1 other node(s)" in output  # node_b was asked

        # Every epoch of every trial was trained by one worker on each node.
        results = sorted((storage / "multinode").glob("*/result.json"))
        assert len(results) == 2, output[-3000:]
        for result_file in results:
            rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
            assert rows, f"{result_file} is empty"
            for row in rows:
                assert set(row["node_ids"].split(",")) == set(nodes.values()), (result_file, row["node_ids"])

        stop_cluster(cluster)
        assert processes_of(cluster.temp_dir) == []

    # One decoded cache, built by the driver before the first trial (prado_search.json is written
    # right after), never rebuilt by a worker of either node: they all reopened it.
    summary = json.loads((storage / "multinode" / "summary" / "summary.json").read_text())
    assert len(summary["trials"]) == 2
    entries = sorted(path.name for path in cache_dir.iterdir())
    assert len(entries) == 2 and entries[1] == f"{entries[0]}.lock", entries
    built = (cache_dir / entries[0] / "images.npy").stat().st_mtime
    assert built <= (storage / "multinode" / "prado_search.json").stat().st_mtime
