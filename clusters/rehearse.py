"""Rehearse `clusters/gpu.yaml` on one machine: its node types under Ray's fake multi-node provider.

Each node the autoscaler starts is a real raylet on this machine with the resources its node type
declares (a GPU as a logical resource: a trial gets one and trains on the CPU where there is no
CUDA). The config is derived from gpu.yaml by `local_config`, never kept by hand, so the rehearsal
reads the same node types, worker counts, upscaling speed and idle timeout as `ray up`.

    python clusters/rehearse.py config                    # the derived autoscaling config
    python clusters/rehearse.py up --max-workers 2        # a head with gpu.yaml's 0 CPUs, workers on demand
    PRADO_DIST_AUTOSCALING=1 python -m prado_dist.tune --space demo --address auto \
        --gpus-per-worker 1 --cpus-per-worker 1 --max-concurrent 2
    ray status                                            # (RAY_AUTH_MODE=token, as `up` printed)
    python clusters/rehearse.py down

Ray's fake provider is a private module (ray.autoscaler._private.fake_multi_node, Ray 2.60), named
through the autoscaler's public `external` provider type: the `fake_multinode` type would read a
defaults file that Ray's wheel does not ship. This file is the one place that names it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

GPU_YAML = Path(__file__).resolve().parent / "gpu.yaml"
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
FAKE_HEAD_TYPE = "ray.head.default"  # the node type the fake provider gives its head
# What AWS fills in for gpu.yaml's `resources: {}` from the instance type; the fake provider cannot.
INSTANCE_RESOURCES = {"m5.xlarge": {"CPU": 4}, "g5.xlarge": {"CPU": 4, "GPU": 1}}
EMPTY_LISTS = [
    "cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands", "setup_commands",
    "head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
]  # fmt: skip


def node_resources(node: dict[str, Any], cpus_per_node: int) -> dict[str, float]:
    """A node type's resources (its instance type's where the YAML leaves them to AWS), CPUs scaled
    down to `cpus_per_node` to fit this machine; a type without CPUs (gpu.yaml's head) keeps none."""
    resources = dict(node.get("resources") or INSTANCE_RESOURCES[node["node_config"]["InstanceType"]])
    if resources.get("CPU"):
        resources["CPU"] = cpus_per_node
    return resources


def local_config(
    source: Path = GPU_YAML,
    cpus_per_node: int = 1,
    max_workers: int | None = None,
    idle_timeout_minutes: float | None = None,
) -> dict[str, Any]:
    """The autoscaling config of `source` for the fake provider: same node types and limits."""
    cluster = yaml.safe_load(source.read_text())
    head = cluster["head_node_type"]
    limit = cluster["max_workers"] if max_workers is None else max_workers
    idle = cluster["idle_timeout_minutes"] if idle_timeout_minutes is None else idle_timeout_minutes
    types = {}
    for name, node in cluster["available_node_types"].items():
        types[FAKE_HEAD_TYPE if name == head else name] = {
            "resources": node_resources(node, cpus_per_node),
            "min_workers": node.get("min_workers", 0),
            "max_workers": min(node.get("max_workers", limit), limit),
            "node_config": {},
        }
    return {
        "cluster_name": f"{cluster['cluster_name']}-local",
        "max_workers": limit,
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle,
        # All fake nodes share this machine's IP; the autoscaler tells nodes apart by IP unless told
        # to use node ids (without it, idle workers were never removed: tests/test_autoscaler.py).
        "provider": {"type": "external", "module": FAKE_PROVIDER, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": os.environ.get("USER", "ray")},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {},
        **{key: [] for key in EMPTY_LISTS},
    }  # fmt: skip


def start_command(config_file: Path, config: dict[str, Any], port: int, *more: str) -> list[str]:
    """`ray start --head` with the head node type's resources and the autoscaling config."""
    head = config["available_node_types"][FAKE_HEAD_TYPE]["resources"]
    extra = {key: value for key, value in head.items() if key not in ("CPU", "GPU")}
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}"]
    command += [f"--num-cpus={head.get('CPU', 0)}", f"--num-gpus={head.get('GPU', 0)}"]
    command += [f"--autoscaling-config={config_file}", "--disable-usage-stats", *more]
    return command + ([f"--resources={json.dumps(extra)}"] if extra else [])


def start_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """What the head's processes need: the fake provider's switch, a 1 s autoscaler loop (default 5 s),
    and token authentication as gpu.yaml starts Ray (the token from ~/.ray/auth_token or $RAY_AUTH_TOKEN)."""
    env = dict(os.environ if base is None else base)
    env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token"})
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["config", "up", "down"])
    parser.add_argument("--max-workers", type=int, default=None, help="default: gpu.yaml's")
    parser.add_argument("--idle-timeout-minutes", type=float, default=None, help="default: gpu.yaml's")
    parser.add_argument("--port", type=int, default=6379)
    args = parser.parse_args(argv)
    config = local_config(max_workers=args.max_workers, idle_timeout_minutes=args.idle_timeout_minutes)
    if args.action == "config":
        print(yaml.safe_dump(config, sort_keys=False))
        return 0
    if args.action == "down":
        return subprocess.call([str(Path(sys.executable).with_name("ray")), "stop", "--force"])
    config_file = Path(tempfile.mkdtemp(prefix="prado-rehearsal-")) / "autoscaling.yaml"
    config_file.write_text(yaml.safe_dump(config))
    if not (Path.home() / ".ray" / "auth_token").is_file() and "RAY_AUTH_TOKEN" not in os.environ:
        subprocess.check_call([str(Path(sys.executable).with_name("ray")), "get-auth-token", "--generate"])
    code = subprocess.call(start_command(config_file, config, args.port), env=start_environment())
    if code == 0:
        print(f"Rehearsal cluster up ({config_file}); run ray status and the search with RAY_AUTH_MODE=token")
    return code


if __name__ == "__main__":
    sys.exit(main())
