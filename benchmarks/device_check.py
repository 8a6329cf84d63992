"""The ``full`` recipe on real data in one timed run, with only what the GPU machine's image holds.

``prepare`` (here, with the whole stack): the real download and prepare stages on an official-format folder
(``../shared/data/kmnist-60k``) into a small carried folder: the composed ``params.yaml`` (no Hydra needed
there), the prepared train/validation split and the MD5-checked test files. ``recipe`` (there): the train
stage's training without MLflow: ``fit`` on the prepared split, the refit on train + validation, the test
split scored as the evaluate stage scores it; as many epochs as fit in ``--budget-s`` (at most
``train.epochs``), judged from timed steps first. Optionally the plain loop of ``benchmarks.real_data``.

    python -m benchmarks.device_check prepare --source ../shared/data/kmnist-60k --dest .device/kmnist-60k
    python -m benchmarks.device_check recipe --data .device/kmnist-60k --device cuda --budget-s 200
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.train_throughput import K49_TRAIN_IMAGES, Variant, machine, make_trainer, timed
from pipeline import data
from pipeline.config import Settings, load_settings
from pipeline.contract import official_file_names
from pipeline.stages import evaluate
from pipeline.training.bundle import select_device
from pipeline.training.inputs import TrainingInputs, load_training_inputs
from pipeline.training.loop import fit, resolve_speed
from pipeline.training.plan import plan_steps
from pipeline.training.records import TrainResult
from pipeline.training.refit import model_epochs, refit

PARAMS_NAME = "params.yaml"
PROBE_STEPS = 20  # timed steps that size the run (after as many untimed ones): --probe-steps
SAFETY = 1.25  # validation, evaluation and the per-epoch bookkeeping on top of the timed steps
# The K49 `full` run that the measured rate projects: 30 trials x 10 epochs on <= 1,500 images a class (an
# upper bound, 49 x 1,500; pruning ends trials sooner), then 60 validated epochs on 90% and 60 refit on 100%.
K49_TUNE_IMAGES = 30 * 10 * 49 * 1_500
K49_FULL_IMAGES = 60 * round(0.9 * K49_TRAIN_IMAGES) + 60 * K49_TRAIN_IMAGES


def prepare(source: Path, dest: Path) -> Path:
    """Download (local copy, MD5s recorded) and prepare ``source`` on the ``full`` profile into ``dest``,
    then keep only what ``recipe`` reads: params.yaml, data/prepared, the test files and the manifest."""
    from pipeline.config import write_params
    from pipeline.stages import download
    from pipeline.stages import prepare as prepare_stage

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    settings = load_settings(write_params(dest / PARAMS_NAME, [
        "profile=full", "data.dataset=local", f"data.local_dir={source.resolve()}", "tune.n_trials=0"]))
    download.run(settings)
    prepare_stage.run(settings)
    names = official_file_names(data.read_manifest(settings)["prefix"])
    for role in ("train_images", "train_labels"):  # the prepared split holds them; they need not travel
        (settings.path("raw") / names[role]).unlink()
    for folder in ("downloads", "reports"):
        shutil.rmtree(settings.path(folder), ignore_errors=True)
    return dest


def _settings(args: argparse.Namespace) -> Settings:
    changes: dict[str, Any] = {"train.device": args.device}
    if args.max_train_per_class:
        changes["train.max_train_per_class"] = args.max_train_per_class
        changes["train.max_val_per_class"] = max(1, args.max_train_per_class // 9)
    if args.compile:
        changes["train.compile"] = True
    return load_settings(args.data / PARAMS_NAME).with_overrides(changes)


def seconds_per_image(settings: Settings, inputs: TrainingInputs, device: torch.device,
                      steps: int = PROBE_STEPS) -> float:
    """Median seconds a training image costs, from timed steps of the recipe's batch on this device."""
    plan = plan_steps(settings.train, len(inputs.train))
    speed = resolve_speed(settings.train, device)
    images = torch.from_numpy(inputs.train.images).to(device)
    labels = torch.from_numpy(inputs.train.labels.astype("int64")).to(device)
    variant = Variant("recipe", speed.amp, speed.channels_last, speed.compile)
    trainer = make_trainer(settings, device, variant, images, labels, plan.batch_size,
                           num_classes=inputs.num_classes)

    def one(i: int) -> None:
        trainer.step(*trainer.batch(i))

    for i in range(steps):
        one(i)
    times = [timed(device, partial(one, steps + i)) for i in range(steps)]
    return statistics.median(times) / plan.batch_size


def epochs_that_fit(settings: Settings, inputs: TrainingInputs, per_image_s: float, budget_s: float) -> int:
    """The validated run's epochs (the refit doubles them) that fit the budget, at most ``train.epochs``."""
    cfg = settings.train
    n_all = len(inputs.train) + len(inputs.val)
    per_epoch = SAFETY * per_image_s * (len(inputs.train) + (cfg.refit_epochs_fraction * n_all if cfg.refit else 0))
    return max(1, min(cfg.epochs, math.floor(budget_s / per_epoch)))


def _history(result: TrainResult) -> list[dict[str, Any]]:
    return [{key: round(value, 5) if isinstance(value, float) else value for key, value in m.as_dict().items()}
            for m in result.history]


def run_recipe(settings: Settings, device: torch.device, budget_s: float, probe_steps: int = PROBE_STEPS,
               max_test_per_class: int | None = None) -> tuple[dict[str, Any], TrainingInputs]:
    """The train stage's training and the evaluate stage's scoring, without MLflow; timed."""
    cfg = settings.train
    inputs = load_training_inputs(settings, cfg.max_train_per_class, cfg.max_val_per_class)
    per_image_s = seconds_per_image(settings, inputs, device, probe_steps)
    epochs = epochs_that_fit(settings, inputs, per_image_s, budget_s)
    settings = settings.with_overrides({"train.epochs": epochs})
    started = time.perf_counter()
    result = fit(settings, inputs.train, inputs.val, inputs.num_classes, inputs.pixel_mean, inputs.pixel_std)
    runs = [result, refit(settings, result, inputs)] if cfg.refit else [result]
    train_s = time.perf_counter() - started
    test = data.subset_per_class(data.load_test(settings), max_test_per_class, settings.seed)
    model = runs[-1].model.set_views(settings.model.tta_rotations_deg)  # as the train stage exports it
    logits = evaluate.predict(model, test.images, settings.evaluate.batch_size, device)
    trained_images = sum(len(inputs.train) for _ in result.history) + (
        sum(len(inputs.train) + len(inputs.val) for _ in runs[-1].history) if cfg.refit else 0)
    return {
        "epochs": epochs, "refit": cfg.refit, "model_epochs": model_epochs(cfg, result, runs[1:]),
        "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
        "best_val_balanced_accuracy": result.best.val_balanced_accuracy,
        "n_train": len(inputs.train), "n_val": len(inputs.val),
        "batch_size": plan_steps(cfg, len(inputs.train)).batch_size, "speed": asdict(resolve_speed(cfg, device)),
        "probe_seconds_per_image": per_image_s, "train_seconds": round(train_s, 2),
        "seconds_per_training_image": train_s / trained_images,
        "epoch_seconds": [round(m.seconds, 3) for run in runs for m in run.history],
        **evaluate.summarize(test.labels, logits.argmax(axis=1), inputs.num_classes),
        "history": _history(result), "refit_history": _history(runs[-1]) if cfg.refit else [],
    }, inputs


def projected_k49(seconds_per_image: float) -> dict[str, float]:
    """The K49 ``full`` run's training time at this measured rate (tuning, validated run, refit)."""
    return {"tune_s": round(K49_TUNE_IMAGES * seconds_per_image), "train_and_refit_s":
            round(K49_FULL_IMAGES * seconds_per_image), "epoch_s": round(K49_TRAIN_IMAGES * seconds_per_image, 2)}


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    settings = _settings(args)
    device = select_device(settings.train.device)
    torch.manual_seed(settings.seed)
    pipeline, inputs = run_recipe(settings, device, args.budget_s, args.probe_steps, args.max_test_per_class)
    result: dict[str, Any] = {
        "benchmark": "device_check_recipe", "data": str(args.data), "machine": machine(device),
        "recipe": settings.run_identity("model", "augment", "train"), "pipeline_full_recipe": pipeline,
        "projected_k49_full_run": projected_k49(pipeline["seconds_per_training_image"]),
    }
    _write(args.out, result)  # the recipe's figures are kept even if the plain loop runs out of time
    if args.plain_epochs:
        from benchmarks.real_data import plain_loop

        test = data.subset_per_class(data.load_test(settings), args.max_test_per_class, settings.seed)
        everything = data.LabeledImages(np.concatenate([inputs.train.images, inputs.val.images]),
                                        np.concatenate([inputs.train.labels, inputs.val.labels]))
        result["plain_loop"] = plain_loop(everything, test, inputs.num_classes, args.plain_epochs,
                                          settings.augment, device)
        result["pipeline_minus_plain_points"] = round(100 * (pipeline["test_balanced_accuracy"] -
                                                             result["plain_loop"]["test_balanced_accuracy"]), 2)
    _write(args.out, result)
    summary = {key: pipeline[key] for key in ("epochs", "train_seconds", "test_balanced_accuracy", "test_accuracy")}
    print(json.dumps({**summary, "projected_k49_full_run": result["projected_k49_full_run"],
                      "plain_loop": result.get("plain_loop", {}).get("test_balanced_accuracy")}))
    return result


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="download + prepare a folder into a carried folder (here)")
    prep.add_argument("--source", type=Path, required=True)
    prep.add_argument("--dest", type=Path, required=True)
    rec = commands.add_parser("recipe", help="train the full recipe and score the test split")
    rec.add_argument("--data", type=Path, required=True, help="a folder written by `prepare`")
    rec.add_argument("--device", default="auto")
    rec.add_argument("--budget-s", type=float, default=200.0, help="training seconds (validated run + refit)")
    rec.add_argument("--max-train-per-class", type=int, default=None, help="tiny runs (the dry run)")
    rec.add_argument("--max-test-per-class", type=int, default=None, help="tiny runs: score fewer test images")
    rec.add_argument("--probe-steps", type=int, default=PROBE_STEPS, help="timed steps that size the run")
    rec.add_argument("--compile", action="store_true", help="train with torch.compile")
    rec.add_argument("--plain-epochs", type=int, default=0, help="also the plain loop, this many epochs")
    rec.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print(prepare(args.source, args.dest))
    else:
        recipe(args)


if __name__ == "__main__":
    main()
