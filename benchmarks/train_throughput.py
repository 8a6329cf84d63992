"""Training throughput of SpinalVGG: the step alone vs the full batch pipeline (gather + augment + step).

The loop in ``pipeline.training.loop.fit`` keeps the uint8 dataset on the device and augments each batch there;
this measures what that costs relative to the optimisation step itself, on the same machine, in the
same run, with the same functions ``fit`` calls (``load_batch``, ``train_step``, EMA update). Target:
loading + augmentation <= 5% of the step time. On CUDA it also projects the seconds per K49 epoch.

    python -m benchmarks.train_throughput                 # device from params.yaml (auto), full profile
    python -m benchmarks.train_throughput --compile       # CUDA: with torch.compile
    python -m benchmarks.train_throughput --steps 20 --out benchmarks/results/train_throughput_cuda.json

Data: K49-sized random uint8 images (232,365 x 28 x 28) and labels; the values do not change the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import load_settings
from pipeline.contract import GLYPH_SIDE
from pipeline.model import build_model, count_parameters
from pipeline.training.bundle import select_device
from pipeline.training.loop import load_batch, train_step
from pipeline.training.plan import make_optimizer, make_weight_average
from pipeline.transforms import BatchAugment

K49_TRAIN_IMAGES = 232_365  # official K49 training set size
K49_CLASSES = 49
OVERHEAD_TARGET = 0.05  # loading + augmentation, as a fraction of the step time
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_STEPS = {"cpu": 6, "cuda": 50, "mps": 20}
DEFAULT_WARMUP = {"cpu": 2, "cuda": 10, "mps": 5}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(device: torch.device, fn: Callable[[], object]) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "device": str(device),
        "cpu": cpu_model_name(),
        "cpu_cores_visible": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="auto|cuda|mps|cpu (default: train.device)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (and compile)")
    parser.add_argument("--images", type=int, default=K49_TRAIN_IMAGES, help="synthetic dataset size")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default: benchmarks/results/train_throughput_<device>.json)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = load_settings()
    cfg = settings.train
    device = select_device(args.device or cfg.device)
    on_cuda = device.type == "cuda"
    amp, channels_last = cfg.amp and on_cuda, cfg.channels_last and on_cuda
    compiled = args.compile and on_cuda
    batch_size = args.batch_size or cfg.batch_size
    steps = args.steps or DEFAULT_STEPS[device.type]
    warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[device.type]
    print(f"device: {device} ({machine(device).get('gpu', cpu_model_name())}), batch {batch_size}, "
          f"amp={amp}, channels_last={channels_last}, compile={compiled}, threads={torch.get_num_threads()}")

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    images = torch.randint(0, 256, (args.images, GLYPH_SIDE, GLYPH_SIDE), dtype=torch.uint8,
                           generator=generator).to(device)
    labels = torch.randint(0, K49_CLASSES, (args.images,), generator=generator).to(device)
    model = build_model(settings, K49_CLASSES, pixel_mean=0.2, pixel_std=0.35).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = make_weight_average(model, cfg.ema_decay)
    optimizer = make_optimizer(cfg, model)
    step_model = torch.compile(model) if compiled else model
    augment = BatchAugment(settings.augment, generator)
    loss_weight = torch.ones(K49_CLASSES, device=device)
    order = torch.randperm(args.images, generator=generator)

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = (i * batch_size) % (args.images - batch_size)
        index = order[start:start + batch_size].to(device, non_blocking=True)
        return load_batch(images, labels, index, augment, channels_last)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        train_step(step_model, x, y, optimizer, loss_weight, cfg.label_smoothing, amp)
        ema.update_parameters(model)

    fixed_x, fixed_y = batch(0)
    for i in range(warmup):
        step(*batch(i))
    # Interleave the variants so drift in machine load hits both alike; medians resist outliers.
    step_s, load_s, full_s = [], [], []
    for i in range(steps):
        step_s.append(_timed(device, lambda: step(fixed_x, fixed_y)))
        holder: list[tuple[torch.Tensor, torch.Tensor]] = []
        load_s.append(_timed(device, lambda: holder.append(batch(i))))
        full_s.append(_timed(device, lambda: step(*batch(i))))
    step_median, load_median, full_median = (statistics.median(v) for v in (step_s, load_s, full_s))
    overhead = load_median / step_median
    result: dict[str, object] = {
        "benchmark": "train_throughput",
        "machine": machine(device),
        "config": {"batch_size": batch_size, "amp_bf16": amp, "channels_last": channels_last,
                   "compile": compiled, "optimizer": cfg.optimizer, "ema_decay": cfg.ema_decay,
                   "augment": settings.augment.model_dump(), "dataset_images": args.images,
                   "model_parameters": count_parameters(model), "timed_steps": steps, "warmup_steps": warmup},
        "step_only_images_per_s": round(batch_size / step_median, 2),
        "full_pipeline_images_per_s": round(batch_size / full_median, 2),
        "median_seconds": {"step": step_median, "load_and_augment": load_median, "full": full_median},
        "load_augment_overhead_ratio": round(overhead, 5),
        "full_vs_step_slowdown_ratio": round(full_median / step_median - 1.0, 5),
        "overhead_target": OVERHEAD_TARGET,
        "meets_target": overhead <= OVERHEAD_TARGET,
        "projected_seconds_per_k49_epoch": round(K49_TRAIN_IMAGES * full_median / batch_size, 1),
    }
    if not on_cuda:
        result["note"] = "projection on this device is for scale only; the recipe targets CUDA"
    out = args.out or RESULTS_DIR / f"train_throughput_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"step only        : {result['step_only_images_per_s']:>10} images/s")
    print(f"full pipeline    : {result['full_pipeline_images_per_s']:>10} images/s")
    print(f"load+augment     : {overhead:.2%} of the step time (target <= {OVERHEAD_TARGET:.0%})")
    print(f"K49 epoch (proj.): {result['projected_seconds_per_k49_epoch']} s   -> {out}")
    return result


if __name__ == "__main__":
    main()
