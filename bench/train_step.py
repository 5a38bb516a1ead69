"""Training-step throughput of the report's three CNNs: images/s, peak memory, FLOPs, achieved FLOP/s.

One training step = forward + cross-entropy + backward + Adam step on random, already-normalised
224x224 images, batch 32 (the report's setting). CPU always; CUDA too when available (bf16 autocast,
channels_last). Appends one JSON line per (model, device) to bench/results/train_step.jsonl.

    python bench/train_step.py                       # vgg, resnet29, mobilenet; CPU (+ CUDA)
    python bench/train_step.py --models mobilenet --steps 10 --devices cpu

Each (model, device) runs in a fresh process, so one model's freed-but-retained memory cannot inflate
the next one's peak. Forward FLOPs come from torch.utils.flop_counter.FlopCounterMode (2 FLOPs per
multiply-add, convs and matmuls only) on one image; a training step is counted as 3x the forward
(backward ~ 2x forward). Peak memory: CPU = the process's peak resident set (VmHWM, also given minus the
RSS before the model was built), CUDA = torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prado_dist.models import create_model

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.jsonl"


def proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (kB there) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def forward_flops_per_image(name: str, image_size: int) -> int:
    """Forward FLOPs for one image (eval mode: VGG's BatchNorm1d cannot train on a batch of one)."""
    model = create_model(name, image_size=image_size).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size))
    return counter.get_total_flops()


def time_training_steps(
    name: str, device: torch.device, batch_size: int, image_size: int, warmup: int, steps: int
) -> dict[str, Any]:
    """Median step time and peak memory of `steps` timed training steps after `warmup` ones."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = proc_status_bytes("VmRSS")

    torch.manual_seed(0)
    model = create_model(name, image_size=image_size).to(device)
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    # The report's optimiser: Adam, lr 1e-3, Keras epsilon 1e-7.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 5, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    durations = []
    for index in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        if index >= warmup:
            durations.append(time.perf_counter() - start)

    result: dict[str, Any] = {
        "step_seconds": durations,
        "step_seconds_median": statistics.median(durations),
        # On a shared machine other processes only ever slow a step down: the fastest step is the
        # best estimate of what the hardware does, the median of what a run here would see.
        "step_seconds_min": min(durations),
    }
    if cuda:
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        peak = proc_status_bytes("VmHWM")
        result["peak_memory_bytes"] = peak
        result["peak_memory_over_start_bytes"] = peak - rss_before if peak and rss_before else None
        result["peak_memory_kind"] = "VmHWM (peak RSS of a fresh process)"
    return result


def measure(
    name: str, device_name: str, batch_size: int, image_size: int, warmup: int, steps: int
) -> tuple[int, dict[str, Any]]:
    """Forward FLOPs per image and the timed training steps of one model on one device."""
    timing = time_training_steps(name, torch.device(device_name), batch_size, image_size, warmup, steps)
    return forward_flops_per_image(name, image_size), timing


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg", "resnet29", "mobilenet"])
    default_devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    parser.add_argument("--devices", nargs="+", default=default_devices, choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=32)  # report: 32
    parser.add_argument("--image-size", type=int, default=224)  # report: 224
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: cpu 3, cuda 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: cpu 2, cuda 5)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    machine = machine_info()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for device_name in args.devices:
        device = torch.device(device_name)
        steps = args.steps or (20 if device.type == "cuda" else 3)
        # Two untimed steps on CPU: the first timed step after a single warm-up one still ran 2x slower.
        warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 2)
        for name in args.models:
            # A fresh process per measurement (see module docstring); spawn, not fork, for CUDA's sake.
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                flops, timing = pool.submit(
                    measure, name, device_name, args.batch_size, args.image_size, warmup, steps
                ).result()
            images_per_second = args.batch_size / timing["step_seconds_median"]
            record = {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": command,
                "machine": machine,
                "load_average_1min": os.getloadavg()[0],  # other processes on a shared machine slow it down
                "model": name,
                "device": device.type,
                "precision": "bf16 autocast, channels_last" if device.type == "cuda" else "fp32",
                "batch_size": args.batch_size,
                "image_size": args.image_size,
                "warmup_steps": warmup,
                "timed_steps": steps,
                **timing,
                "images_per_second": images_per_second,
                "images_per_second_best": args.batch_size / timing["step_seconds_min"],
                "forward_gflops_per_image": flops / 1e9,
                "train_gflops_per_image": 3 * flops / 1e9,
                "achieved_train_tflops": 3 * flops * images_per_second / 1e12,
            }
            with args.output.open("a") as results:
                results.write(json.dumps(record) + "\n")
            print(
                f"{name:10s} {device.type:4s} {images_per_second:8.1f} img/s "
                f"(best {record['images_per_second_best']:.1f})  "
                f"step {timing['step_seconds_median']:.2f} s  "
                f"peak {timing['peak_memory_bytes'] / 2**30:.2f} GiB"
                f" ({(timing.get('peak_memory_over_start_bytes') or 0) / 2**30:.2f} over start)  "
                f"fwd {flops / 1e9:.2f} GFLOP/img  {record['achieved_train_tflops'] * 1e3:.1f} GFLOP/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
