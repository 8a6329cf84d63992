"""Which profile fits this machine (``make run`` and deployments choose alike), and what a training stage
will cost on a CPU, said before it starts."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

GPU_PROFILE = "full"
CPU_PROFILE = "cpu"
SMOKE_PROFILE = "quick"
SMOKE_DATASET = "synthetic"
NVIDIA_SMI_TIMEOUT_S = 20
# Training images per second per CPU core, on the careful side, for the bf16 + channels-last step that
# CPUs with native bf16 run (benchmarks/TRAIN.md: the cpu profile's batch 64 in `make run` on kmnist-60k,
# 2 quiet cores: 131-138 a core on an AMD EPYC with AVX-512 BF16, 281-308 a core on an Intel Xeon whose AMX
# tiles run the bf16 convolutions). A busy machine is slower; a wrong guess only changes how strongly the
# warning reads, and every epoch line says how long the rest takes.
CPU_IMAGES_PER_S_PER_CORE = 125.0
AMX_IMAGES_PER_S_PER_CORE = 250.0
# A validation image costs a forward pass only, about a third of a training step.
VALIDATION_COST = 1 / 3
STATS_FILE = "stats.json"  # the prepare stage's per-class counts (docs/ARCHITECTURE.md)
# Train images per class of the official sets, for the estimate before anything is downloaded (K49's
# classes hold 392-6,000: an even spread over-estimates a per-class-capped study a little).
OFFICIAL_TRAIN_IMAGES = {"k49": (232_365, 49), "kmnist": (60_000, 10)}


def gpu_status() -> tuple[bool, str]:
    """(torch can train on a CUDA GPU, how we know). nvidia-smi first: without a driver the answer needs no
    torch import; with one, torch must agree (a CPU-only torch build cannot use the GPU)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "no nvidia-smi on PATH"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"nvidia-smi failed ({exc})"
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    if listed.returncode != 0 or not gpus:
        return False, "nvidia-smi lists no GPU"
    import torch

    if not torch.cuda.is_available():
        return False, f"nvidia-smi lists {len(gpus)} GPU(s) but torch {torch.__version__} cannot use CUDA"
    return True, f"{gpus[0].split(' (UUID')[0]} found by nvidia-smi and torch"


def choose_profile(dataset: str, requested: str | None, gpu: tuple[bool, str]) -> tuple[str, str]:
    """(profile, why) for ``make run``. ``gpu`` is :func:`gpu_status`'s answer."""
    has_gpu, evidence = gpu
    if requested:
        why = f"PROFILE={requested} given"
        if requested == GPU_PROFILE and dataset != SMOKE_DATASET and not has_gpu:
            why += (f", though this machine has no usable GPU ({evidence}): the tune and train stages log "
                    f"their estimated time; PROFILE={CPU_PROFILE} is sized for CPU cores")
        return requested, why
    if dataset == SMOKE_DATASET:
        return SMOKE_PROFILE, f"DATASET={SMOKE_DATASET}: the smoke run of the machinery, minutes on a CPU"
    if has_gpu:
        return GPU_PROFILE, f"{evidence}: the GPU recipe"
    return CPU_PROFILE, (f"no usable GPU ({evidence}): the recipe sized for CPU cores; PROFILE={GPU_PROFILE} "
                         "forces the GPU recipe")


# --------------------------------------------------------------------------------------- CPU estimate


def images_used(counts: Sequence[int], max_per_class: int | None) -> int:
    """Images of a split after the per-class cap (``None`` = all)."""
    return int(sum(count if max_per_class is None else min(count, max_per_class) for count in counts))


def estimated_cpu_seconds(stage: str, settings: Any, train_counts: Sequence[int], val_counts: Sequence[int],
                          cores: int) -> float:
    """Upper estimate of ``stage``'s training time on ``cores`` CPU cores (early stopping and pruning only
    shorten it). ``train_counts``/``val_counts``: prepared images per class."""
    if stage == "tune":
        cfg = settings.tune
        epochs = cfg.n_trials * cfg.epochs
    else:
        cfg = settings.train
        epochs = cfg.epochs
    trained, validated = images_used(train_counts, cfg.max_train_per_class), images_used(val_counts,
                                                                                         cfg.max_val_per_class)
    images = epochs * (trained + VALIDATION_COST * validated)
    if stage == "train" and cfg.refit:  # then the refit on train + validation (refit_epochs_fraction of that)
        images += cfg.refit_epochs(epochs) * (trained + validated)
    return images / (cpu_images_per_s_per_core(settings.train.amp) * max(cores, 1))


def cpu_images_per_s_per_core(amp: bool) -> float:
    """The estimate's rate: AMX only speeds up the bf16 step (``train.amp``), about 2.2x (benchmarks/TRAIN.md)."""
    import torch

    amx = amp and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return AMX_IMAGES_PER_S_PER_CORE if amx else CPU_IMAGES_PER_S_PER_CORE


def readable_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, math.ceil(seconds))} s"
    if seconds < 90 * 60:
        return f"{math.ceil(seconds / 60)} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def trains_on_cpu(device_preference: str) -> bool:
    """Whether ``train.device`` resolves to the CPU here (auto: cuda > mps > cpu, as pipeline.train)."""
    if device_preference == "cpu":
        return True
    if device_preference != "auto":
        return False
    import torch

    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_time_note(stage: str, settings: Any) -> str | None:
    """One line for the start of the tune/train stage when it trains on a CPU: the estimated time and, for
    the GPU recipe, how to pick the CPU profile. None on a GPU (or before the data is prepared)."""
    if not trains_on_cpu(settings.train.device):
        return None
    stats_path = settings.path("prepared") / STATS_FILE
    try:
        counts = json.loads(stats_path.read_text(encoding="utf-8"))["counts"]
        train_counts, val_counts = counts["train"], counts["val"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no prepared data yet: the stage itself will say what is missing
    cores = _cores()
    seconds = estimated_cpu_seconds(stage, settings, train_counts, val_counts, cores)
    rate = cpu_images_per_s_per_core(settings.train.amp) * cores
    note = (f"{stage} on the CPU: up to about {readable_duration(seconds)} for profile {settings.profile} "
            f"(at ~{rate:.0f} training images/s on {cores} core(s); early stopping or pruning end sooner)")
    if settings.profile == GPU_PROFILE:
        note += (f". Profile {GPU_PROFILE} is the GPU recipe: for a run sized for CPU cores stop here and use "
                 f"`make run PROFILE={CPU_PROFILE}` (or `dvc exp run -S profile={CPU_PROFILE}`)")
    return note


def expected_train_counts(settings: Any) -> list[int] | None:
    """Train images per class before the download stage has run: the labels file of a local folder, or the
    official totals spread evenly. None for synthetic data (the smoke run: minutes)."""
    data = settings.data
    if data.dataset in OFFICIAL_TRAIN_IMAGES:
        total, classes = OFFICIAL_TRAIN_IMAGES[data.dataset]
        return [total // classes + (index < total % classes) for index in range(classes)]
    if data.dataset != "local" or data.local_dir is None:
        return None
    from pipeline.contract import DataError
    from pipeline.data import local_prefix, read_npz_array

    folder = data.local_dir if data.local_dir.is_absolute() else settings.root / data.local_dir
    try:
        prefix = local_prefix(folder, data.local_prefix)
        labels = read_npz_array(folder / f"{prefix}-train-labels.npz")
    except DataError:
        return None  # the download stage will say what is wrong with the folder
    import numpy as np

    return [int(count) for count in np.bincount(labels.astype(np.int64).ravel()) if count]


def run_time_note(settings: Any) -> str | None:
    """One line before a run starts: the tune and train stages' CPU estimate for the whole data set, or None
    on a GPU or when the data's size is unknown."""
    counts = expected_train_counts(settings)
    if counts is None or not trains_on_cpu(settings.train.device):
        return None
    val = [math.ceil(settings.data.val_fraction * count) for count in counts]
    train = [count - held for count, held in zip(counts, val, strict=True)]
    cores = _cores()
    tune = estimated_cpu_seconds("tune", settings, train, val, cores) if settings.tune.n_trials else 0.0
    fit = estimated_cpu_seconds("train", settings, train, val, cores)
    rate = cpu_images_per_s_per_core(settings.train.amp) * cores
    return (f"this run trains on the CPU: up to about {readable_duration(tune + fit)} for tune "
            f"({readable_duration(tune) if tune else 'off'}) and train ({readable_duration(fit)}), profile "
            f"{settings.profile}, {sum(counts):,} train images, at ~{rate:.0f} "
            f"training images/s on {cores} core(s); downloading, evaluation and packaging add minutes")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher choose-profile",
                                     description="Print the profile `make run` uses on this machine.")
    parser.add_argument("--dataset", required=True, help="data.dataset of the run")
    parser.add_argument("--profile", default="", help="an explicit profile (always wins); empty = choose")
    args = parser.parse_args(argv)
    # The GPU matters when choosing for real data, and to warn when the GPU recipe is forced onto a CPU.
    check_gpu = args.dataset != SMOKE_DATASET and args.profile in ("", GPU_PROFILE)
    gpu = gpu_status() if check_gpu else (False, "not checked")
    profile, why = choose_profile(args.dataset, args.profile or None, gpu)
    print(f"make run: profile {profile} ({why})", file=sys.stderr)
    print(profile)
    return 0
