"""`ray up` rehearsed on this machine (issue 26): clusters/gpu.yaml's node types, derived by
clusters/rehearse.py, under Ray's fake multi-node provider. The head has gpu.yaml's 0 CPUs; a search
whose trials ask for a GPU makes the autoscaler start `gpu_worker` nodes (a logical GPU each; the
trials train on the CPU), the trials run on them, and the idle workers are removed after the timeout.

Isolated from other Ray instances like tests/test_multinode.py (a private temp dir, free ports, a
private auth token), whose helpers it uses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.test_multinode import LocalCluster, node_ports, nodes_of, processes_of, run_tune, stop_cluster

REHEARSE = Path(__file__).resolve().parents[1] / "clusters" / "rehearse.py"
IDLE_TIMEOUT_MINUTES = 0.25


def rehearse_module():
    spec = importlib.util.spec_from_file_location("rehearse", REHEARSE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_derived_config_keeps_gpu_yamls_node_types_and_limits() -> None:
    rehearse = rehearse_module()
    source = yaml.safe_load((REHEARSE.parent / "gpu.yaml").read_text())
    config = rehearse.local_config(max_workers=2)
    assert config["idle_timeout_minutes"] == source["idle_timeout_minutes"]
    assert config["upscaling_speed"] == source["upscaling_speed"]
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["resources"] == {"CPU": 1, "GPU": 1}  # g5.xlarge's GPU, its 4 CPUs scaled to 1
    assert worker["min_workers"] == source["available_node_types"]["gpu_worker"]["min_workers"]
    assert worker["max_workers"] == 2 and config["max_workers"] == 2
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}  # nothing on the head


def start_head(cluster: LocalCluster, rehearse, folder: Path) -> None:
    port = int(cluster.address.rsplit(":", 1)[1])
    config = rehearse.local_config(max_workers=2, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    config["provider"]["gcs_address"] = cluster.address  # the fake nodes join this head, not :6379
    config_file = folder / "autoscaling.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = rehearse.start_command(config_file, config, port, "--node-ip-address", "127.0.0.1")
    command += ["--temp-dir", cluster.temp_dir, "--include-dashboard=false", *node_ports()]
    command += ["--object-store-memory", str(200 * 1024**2)]
    process = subprocess.Popen(
        command, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    cluster.process_groups.append(process.pid)
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    assert process.returncode == 0, f"ray start --head failed:\n{output[-3000:]}"


@pytest.mark.ray
@pytest.mark.slow
def test_gpu_trials_make_the_autoscaler_start_gpu_workers_that_it_removes_when_idle(
    small_demo: Path, tmp_path: Path
) -> None:
    rehearse = rehearse_module()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: socket paths must fit 107 bytes
    env = rehearse.start_environment(
        {
            **os.environ,
            "RAY_TMPDIR": temp_dir,
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PRADO_DIST_CACHE": str(tmp_path / "cache"),
            "PRADO_DIST_AUTOSCALING": "1",  # as gpu.yaml sets it: trials wait for nodes not yet up
            "PYTHONUNBUFFERED": "1",
        }
    )
    cluster = LocalCluster(address=f"127.0.0.1:{free_port()}", temp_dir=temp_dir, env=env)
    storage = tmp_path / "runs"
    try:
        start_head(cluster, rehearse, tmp_path)
        (head,) = nodes_of(cluster)  # the head alone, without a GPU
        assert head["resources"].get("GPU") is None
        code, output = run_tune(
            cluster,
            [
                *("--space", "demo", "--address", cluster.address, "--data", str(small_demo), "--name", "autoscaled"),
                *("--storage", str(storage), "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db"),
                *("--gpus-per-worker", "1", "--cpus-per-worker", "1", "--max-concurrent", "2", "--num-samples", "2"),
                *("--set", "epochs=2", "--set", "image_size=32"),
            ],
            timeout_s=420,
        )
        assert code == 0, output[-5000:]
        # Every node but the head was started by the autoscaler, as a gpu_worker (the only type it may
        # start); a node removed already is listed dead, without its resources.
        nodes = nodes_of(cluster)
        gpu_nodes = {node["id"] for node in nodes if node["id"] != head["id"]}
        assert 1 <= len(gpu_nodes) <= 2, nodes  # within gpu_worker's max_workers
        assert all(node["resources"].get("GPU") == 1 for node in nodes if node["id"] in gpu_nodes and node["alive"])
        for result_file in sorted((storage / "autoscaled").glob("*/result.json")):
            rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
            assert rows and all(row["node_ids"] in gpu_nodes for row in rows), (result_file, gpu_nodes)
        with sqlite3.connect(tmp_path / "mlflow.db") as db:
            statuses = sorted(status for (status,) in db.execute("select status from runs"))
        assert statuses == ["FINISHED"] * 3  # the search's parent run and both trials'

        deadline = time.monotonic() + IDLE_TIMEOUT_MINUTES * 60 + 90
        while any(node["alive"] and node["id"] in gpu_nodes for node in nodes_of(cluster)):
            assert time.monotonic() < deadline, f"idle GPU workers were not removed: {nodes_of(cluster)}"
            time.sleep(5)
        stop_cluster(cluster)
        assert processes_of(temp_dir) == []
    finally:
        stop_cluster(cluster)
        shutil.rmtree(temp_dir, ignore_errors=True)
