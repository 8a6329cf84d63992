"""Training throughput of SpinalVGG: the step alone vs the full batch pipeline (gather + augment + step).

The loop in ``pipeline.training.loop.fit`` keeps the uint8 dataset on the device and augments each batch there;
this measures what that costs relative to the optimisation step itself, on the same machine, in the
same run, with the same functions ``fit`` calls (``load_batch``, ``train_step``, EMA update). Target:
loading + augmentation <= 5% of the step time. On CUDA it also projects the seconds per K49 epoch.

    python -m benchmarks.train_throughput                 # device from params.yaml (auto), full profile
    python -m benchmarks.train_throughput --compile       # with torch.compile
    python -m benchmarks.train_throughput --steps 20 --out benchmarks/results/train_throughput_cuda.json
    python -m benchmarks.train_throughput --device cpu --variants fp32 bf16 bf16+cl bf16+cl+t1 compile

Without ``--variants`` the step runs as ``fit`` runs it (``loop.resolve_speed``); ``--variants`` times the
full pipeline of each variant round-robin in one run, so a neighbour's load hits them alike.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from pipeline.config import Settings, load_settings
from pipeline.contract import GLYPH_SIDE
from pipeline.model import build_model, count_parameters
from pipeline.training.bundle import select_device
from pipeline.training.loop import load_batch, resolve_speed, train_step
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


def timed(device: torch.device, fn: Callable[[], object]) -> float:
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


@dataclass(frozen=True)
class Variant:
    """One way to run the training step: ``fp32`` (eager, float32), ``+``-joined with ``bf16`` (autocast),
    ``cl`` (channels-last), ``compile`` (torch.compile) and ``tN`` (N torch threads), e.g. ``bf16+cl+t2``."""

    name: str
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None


def parse_variant(text: str) -> Variant:
    parts = {part for part in text.split("+") if part and part != "fp32"}
    threads = [part for part in parts if part.startswith("t") and part[1:].isdigit()]
    unknown = parts - {"bf16", "cl", "compile", *threads}
    if unknown or len(threads) > 1:
        raise ValueError(f"variant {text!r}: use fp32 or bf16, cl, compile, tN joined by '+'")
    return Variant(text, "bf16" in parts, "cl" in parts, "compile" in parts,
                   int(threads[0][1:]) if threads else None)


@dataclass
class Trainer:
    """One variant's model, optimiser, weight average and batch source, as ``fit`` builds them."""

    variant: Variant
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    step: Callable[[torch.Tensor, torch.Tensor], None]
    parameters: int


def make_trainer(settings: Settings, device: torch.device, variant: Variant, images: torch.Tensor,
                 labels: torch.Tensor, batch_size: int, num_classes: int = K49_CLASSES) -> Trainer:
    """The model, optimiser, EMA and batch source of one variant, seeded alike, built as ``fit`` builds them."""
    cfg = settings.train
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = build_model(settings, num_classes, pixel_mean=0.2, pixel_std=0.35).to(device)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = make_weight_average(model, cfg.ema_decay)
    optimizer = make_optimizer(cfg, model)
    step_model = cast(nn.Module, torch.compile(model)) if variant.compile else model
    augment = BatchAugment(settings.augment, generator)
    loss_weight = torch.ones(num_classes, device=device)
    order = torch.randperm(len(labels), generator=generator)

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = (i * batch_size) % (len(labels) - batch_size)
        index = order[start:start + batch_size].to(device, non_blocking=True)
        return load_batch(images, labels, index, augment, variant.channels_last)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        train_step(step_model, x, y, optimizer, loss_weight, cfg.label_smoothing, variant.amp)
        ema.update_parameters(model)

    return Trainer(variant, batch, step, count_parameters(model))


def _data(settings: Settings, device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(settings.seed)
    images = torch.randint(0, 256, (n, GLYPH_SIDE, GLYPH_SIDE), dtype=torch.uint8, generator=generator)
    return images.to(device), torch.randint(0, K49_CLASSES, (n,), generator=generator).to(device)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="auto|cuda|mps|cpu (default: train.device)")
    parser.add_argument("--params", type=Path, default=None, help="settings file (default: params.yaml)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (and compile)")
    parser.add_argument("--images", type=int, default=K49_TRAIN_IMAGES, help="synthetic dataset size")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                        help="compare these step variants, interleaved (e.g. fp32 bf16 bf16+cl compile t1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default: benchmarks/results/train_throughput_<device>.json)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = load_settings(args.params)
    device = select_device(args.device or settings.train.device)
    batch_size = args.batch_size or settings.train.batch_size
    steps = args.steps or DEFAULT_STEPS[device.type]
    warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[device.type]
    images, labels = _data(settings, device, args.images)
    result: dict[str, Any]
    if args.variants:
        result = compare(settings, device, [parse_variant(v) for v in args.variants], images, labels,
                         batch_size, steps, warmup)
    else:
        speed = resolve_speed(settings.train, device)
        variant = Variant("settings", speed.amp, speed.channels_last, args.compile or speed.compile)
        result = overhead(settings, device, make_trainer(settings, device, variant, images, labels, batch_size),
                          steps, warmup)
    result["config"] = {"batch_size": batch_size, "optimizer": settings.train.optimizer,
                        "ema_decay": settings.train.ema_decay, "augment": settings.augment.model_dump(),
                        "dataset_images": args.images, "timed_steps": steps, "warmup_steps": warmup,
                        **result.get("config", {})}
    out = args.out or RESULTS_DIR / f"train_throughput_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"-> {out}")
    return result


def overhead(settings: Settings, device: torch.device, trainer: Trainer, steps: int, warmup: int
             ) -> dict[str, Any]:
    """The step alone vs gather + augmentation vs both, interleaved; the K49 epoch projected."""
    variant, batch_size = trainer.variant, len(trainer.batch(0)[1])
    print(f"device: {device} ({machine(device).get('gpu', cpu_model_name())}), batch {batch_size}, "
          f"amp={variant.amp}, channels_last={variant.channels_last}, compile={variant.compile}, "
          f"threads={torch.get_num_threads()}")
    fixed_x, fixed_y = trainer.batch(0)
    for i in range(warmup):
        trainer.step(*trainer.batch(i))
    # Interleave the variants so drift in machine load hits both alike; medians resist outliers.
    step_s, load_s, full_s = [], [], []
    for i in range(steps):
        step_s.append(timed(device, lambda: trainer.step(fixed_x, fixed_y)))
        holder: list[tuple[torch.Tensor, torch.Tensor]] = []
        load_s.append(timed(device, lambda: holder.append(trainer.batch(i))))
        full_s.append(timed(device, lambda: trainer.step(*trainer.batch(i))))
    step_median, load_median, full_median = (statistics.median(v) for v in (step_s, load_s, full_s))
    ratio = load_median / step_median
    result: dict[str, Any] = {
        "benchmark": "train_throughput",
        "machine": machine(device),
        "config": {"amp_bf16": variant.amp, "channels_last": variant.channels_last, "compile": variant.compile,
                   "model_parameters": trainer.parameters},
        "step_only_images_per_s": round(batch_size / step_median, 2),
        "full_pipeline_images_per_s": round(batch_size / full_median, 2),
        "median_seconds": {"step": step_median, "load_and_augment": load_median, "full": full_median},
        "load_augment_overhead_ratio": round(ratio, 5),
        "full_vs_step_slowdown_ratio": round(full_median / step_median - 1.0, 5),
        "overhead_target": OVERHEAD_TARGET,
        "meets_target": ratio <= OVERHEAD_TARGET,
        "projected_seconds_per_k49_epoch": round(K49_TRAIN_IMAGES * full_median / batch_size, 1),
    }
    if device.type != "cuda":
        result["note"] = "projection on this device is for scale only; the recipe targets CUDA"
    print(f"step only        : {result['step_only_images_per_s']:>10} images/s")
    print(f"full pipeline    : {result['full_pipeline_images_per_s']:>10} images/s")
    print(f"load+augment     : {ratio:.2%} of the step time (target <= {OVERHEAD_TARGET:.0%})")
    print(f"K49 epoch (proj.): {result['projected_seconds_per_k49_epoch']} s")
    return result


def compare(settings: Settings, device: torch.device, variants: list[Variant], images: torch.Tensor,
            labels: torch.Tensor, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
    """Full-pipeline steps of each variant, round-robin (the order rotated each round) so that a
    neighbour's load hits every variant alike; images/s from medians, ratios to the first variant."""
    default_threads = torch.get_num_threads()
    trainers = [make_trainer(settings, device, v, images, labels, batch_size) for v in variants]
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    load = [os.getloadavg()[0]]
    for i in range(warmup + steps):
        for k in range(len(trainers)):
            trainer = trainers[(i + k) % len(trainers)]
            torch.set_num_threads(trainer.variant.threads or default_threads)
            seconds = timed(device, lambda t=trainer: t.step(*t.batch(i)))  # type: ignore[misc]
            if i >= warmup:
                times[trainer.variant.name].append(seconds)
        load.append(os.getloadavg()[0])
    torch.set_num_threads(default_threads)
    base = statistics.median(times[variants[0].name])
    rows = {name: {"images_per_s": round(batch_size / statistics.median(s), 2),
                   "speedup_vs_first": round(base / statistics.median(s), 3),
                   "projected_seconds_per_k49_epoch": round(K49_TRAIN_IMAGES * statistics.median(s) / batch_size, 1),
                   "median_seconds": statistics.median(s), "seconds": [round(x, 4) for x in s]}
            for name, s in times.items()}
    for name, row in rows.items():
        print(f"{name:>20}: {row['images_per_s']:>9} images/s  x{row['speedup_vs_first']}")
    return {"benchmark": "train_throughput_variants", "machine": machine(device), "variants": rows,
            "load_average_1min": {"min": min(load), "max": max(load), "mean": round(statistics.fmean(load), 2)}}


if __name__ == "__main__":
    main()
