"""Real data, side by side in one run: the pipeline's ``full`` recipe vs a plain training loop.

(a) **pipeline**: the real stages (download from a local folder, prepare, tune with ``tune.n_trials=0``,
    train, evaluate) on the ``full`` profile with a fixed epoch budget, in a scratch project folder.
(b) **plain**: the loop a practitioner writes first: the same SpinalVGG, Adam with a one-cycle schedule
    to 3e-3, batch 64, the same rotation/translation augmentation, trained on the whole train set (no
    validation split, no weight average, no early stopping), the last epoch's weights scored.

Both report balanced accuracy on the same held-out test files. Target: (a) >= (b). One run moves by
about 0.3 points with the seed on 1,000 test images, so compare the mean over seeds (``--summarize``).

    python -m benchmarks.real_data                                  # ../shared/data/kmnist-dev, 12 epochs
    python -m benchmarks.real_data --data DIR --epochs 12 --out benchmarks/results/real_data_cpu.json
    python -m benchmarks.real_data --seed 3 --out benchmarks/results/real_data_cpu_seed3.json
    python -m benchmarks.real_data --summarize benchmarks/results/real_data_cpu.json \
        benchmarks/results/real_data_cpu_seed*.json                  # mean (a) - (b) and its standard error
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from benchmarks.train_throughput import cpu_model_name
from pipeline import data
from pipeline.config import PROJECT_ROOT, load_settings, write_params
from pipeline.contract import load_classmap, official_file_names
from pipeline.model import SpinalVGG, count_parameters
from pipeline.training.bundle import predict_logits, select_device
from pipeline.transforms import BatchAugment

DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "kmnist-dev"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_EPOCHS = 12
# The plain baseline's recipe (issue 9): a common first loop for MNIST-like data.
PLAIN_BATCH = 64
PLAIN_MAX_LR = 3e-3
PLAIN_SEED = 0
# The side score's test-time views: none, so that the recipe's own (model.tta_rotations_deg) pair against one view.
DEFAULT_SIDE_ROTATIONS: list[float] = []
SCORE_BATCH = 1024


def pipeline_recipe(data_dir: Path, epochs: int, work: Path, device: str, changes: list[str],
                    side_rotations: list[float]) -> dict[str, Any]:
    """The real stages on the ``full`` profile with tuning off and ``epochs`` epochs (plus Hydra ``changes``,
    e.g. ``train.lr=0.05``, to compare a recipe change side by side); the same model is also scored served
    with ``side_rotations`` as its test-time views, which pairs a change of views exactly."""
    from pipeline.stages import download, evaluate, prepare, train, tune  # not imported by plain_loop's users

    settings = load_settings(write_params(work / "params.yaml", [
        "profile=full", "data.dataset=local", f"data.local_dir={data_dir.resolve()}", "tune.n_trials=0",
        f"train.epochs={epochs}", f"train.device={device}", *changes]))
    started = time.perf_counter()
    download.run(settings)
    prepare.run(settings)
    tune.run(settings)
    trained = train.run(settings)
    metrics = evaluate.run(settings)
    return {
        "test_balanced_accuracy": metrics["test_balanced_accuracy"],
        "test_accuracy": metrics["test_accuracy"],
        "tta_views": metrics["tta_views"],
        "tta_rotations_deg": settings.model.tta_rotations_deg,
        "side_rotations_deg": side_rotations,
        "test_balanced_accuracy_side": served_balanced_accuracy(settings.path("models"), data.load_test(settings),
                                                                side_rotations),
        "best_epoch": trained["best_epoch"],
        "best_val_balanced_accuracy": trained["best_val_balanced_accuracy"],
        "epochs_run": trained["epochs_run"],
        "n_train": trained["n_train"],
        "refit": trained["refit"],
        "model_epochs": trained["model_epochs"],
        "model_train_images": trained["model_train_images"],
        "train_seconds": round(trained["train_seconds"], 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def served_balanced_accuracy(models_dir: Path, test: data.LabeledImages,
                             rotations_deg: list[float] | None = None) -> float:
    """Test balanced accuracy of the exported weights with ``rotations_deg`` as test-time views (None: the
    bundle's own), exported to ONNX (verified against PyTorch) and run by ONNX Runtime: as it would be served."""
    from pipeline.contract import BUNDLE_FILE, ONNX_FILE, ONNX_INPUT, ONNX_OUTPUT, onnx_session
    from pipeline.export import export_onnx
    from pipeline.training.bundle import load_bundle

    model, _ = load_bundle(models_dir / BUNDLE_FILE)
    if rotations_deg is not None:
        model.set_views(rotations_deg)
    pixels = test.images.astype(np.float32)[:, None]
    with tempfile.TemporaryDirectory(prefix="tta-") as folder:
        session = onnx_session(export_onnx(model, Path(folder) / ONNX_FILE, pixels[:8]))
        logits = [session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels[start:start + SCORE_BATCH]})[0]
                  for start in range(0, len(pixels), SCORE_BATCH)]
    return float(balanced_accuracy_score(test.labels, np.concatenate(logits).argmax(axis=1)))


def rescore(models_dirs: list[Path], data_dir: Path, rotations_deg: list[float]) -> dict[str, Any]:
    """Each kept models folder (``--keep-models``) served with its own views and with ``rotations_deg``."""
    test = data.LabeledImages(*_official_split(data_dir, data.local_prefix(data_dir, None), "test"))
    return {str(folder): {"test_balanced_accuracy_onnx": served_balanced_accuracy(folder, test),
                          "test_balanced_accuracy_side_onnx": served_balanced_accuracy(folder, test, rotations_deg),
                          "side_rotations_deg": rotations_deg} for folder in models_dirs}


def _official_split(data_dir: Path, prefix: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = official_file_names(prefix)
    images = data.read_npz_array(data_dir / names[f"{split}_images"])
    labels = data.read_npz_array(data_dir / names[f"{split}_labels"]).astype(np.int64)
    return images, labels


def plain_loop(train: data.LabeledImages, test: data.LabeledImages, num_classes: int, epochs: int,
               augment_settings: Any, device: torch.device, seed: int = PLAIN_SEED, fast: bool = False
               ) -> dict[str, Any]:
    """SpinalVGG, Adam + one-cycle to 3e-3, batch 64, rotation/translation; last epoch scored. ``fast``: bf16
    autocast and channels-last as the pipeline's step (a speed setting: equal epochs then take equal time)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = (train.images, train.labels), (test.images, test.labels)
    model = SpinalVGG(num_classes, pixel_mean=float(x_train.mean() / 255),
                      pixel_std=float(x_train.std() / 255)).to(device)
    layout = torch.channels_last if fast else torch.contiguous_format
    model = model.to(memory_format=layout)
    augment = BatchAugment(augment_settings.model_copy(update={"erasing_prob": 0.0, "elastic_px": 0.0}), generator)
    images, labels = torch.from_numpy(x_train).to(device), torch.from_numpy(y_train).to(device)
    steps = len(labels) // PLAIN_BATCH
    optimizer = torch.optim.Adam(model.parameters(), lr=PLAIN_MAX_LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=PLAIN_MAX_LR, total_steps=epochs * steps)
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for step in range(steps):
            index = order[step * PLAIN_BATCH:(step + 1) * PLAIN_BATCH].to(device)
            x = augment(images[index].unsqueeze(1).float()).contiguous(memory_format=layout)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
                loss = torch.nn.functional.cross_entropy(model(x).float(), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    predicted = predict_logits(model, x_test, batch_size=1024, device=device).argmax(1)
    return {
        "test_balanced_accuracy": float(balanced_accuracy_score(y_test, predicted)),
        "test_accuracy": float((predicted == y_test).mean()),
        "epochs_run": epochs,
        "bf16_channels_last": fast,
        "n_train": len(labels),
        "parameters": count_parameters(model),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _by_seed(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per seed: files that ran only (a) (``--skip-plain``) or only (b) (``--skip-pipeline``) at one
    seed are paired into one, so the two sides of a seed may run side by side in two processes."""
    merged: dict[Any, dict[str, Any]] = {}
    for result in results:
        into = merged.setdefault(result.get("seed"), {"seed": result.get("seed")})
        for side in ("pipeline_full_recipe", "plain_loop"):
            if result.get(side) is not None:
                if into.get(side) is not None:
                    raise ValueError(f"two results for {side} at seed {result.get('seed')}: pass each once")
                into[side] = result[side]
    incomplete = [seed for seed, r in merged.items() if not (r.get("pipeline_full_recipe") and r.get("plain_loop"))]
    if incomplete:
        raise ValueError(f"seeds {incomplete} lack (a) or (b): run the missing side with the same --seed")
    return list(merged.values())


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of (a) and (b) over seeds, and the paired difference with its standard error."""
    if not results:
        raise ValueError("nothing to summarize: pass one or more result files written by this script")
    results = _by_seed(results)
    pipeline = [100 * r["pipeline_full_recipe"]["test_balanced_accuracy"] for r in results]
    plain = [100 * r["plain_loop"]["test_balanced_accuracy"] for r in results]
    differences = [a - b for a, b in zip(pipeline, plain, strict=True)]
    n = len(differences)
    return {
        "runs": n,
        "seeds": [r.get("seed") for r in results],
        "pipeline_mean": round(statistics.fmean(pipeline), 3),
        "plain_mean": round(statistics.fmean(plain), 3),
        "pipeline_minus_plain_points": round(statistics.fmean(differences), 3),
        "standard_error_points": round(statistics.stdev(differences) / math.sqrt(n), 3) if n > 1 else None,
        "pipeline_ahead_or_level": sum(d >= 0 for d in differences),
    }


def _commit() -> str | None:
    """The checkout's commit (with ``+changes`` when the tree differs from it), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}+changes" if dirty else head


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder in the official layout")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--plain-epochs", type=int, default=None,
                        help="(b)'s epochs (default --epochs; 2x --epochs matches (a)'s budget with its refit)")
    parser.add_argument("--plain-fast", action="store_true",
                        help="(b) with the pipeline's bf16 autocast and channels-last: equal epochs, equal time")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                        help="a change to the pipeline's recipe (Hydra override), repeatable")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"one seed for both (default: the pipeline's `seed`, {PLAIN_SEED} for the plain loop)")
    sides = parser.add_mutually_exclusive_group()
    sides.add_argument("--skip-plain", action="store_true", help="only (a): e.g. a speed setting's accuracy")
    sides.add_argument("--skip-pipeline", action="store_true",
                       help="only (b): run a seed's two sides in two processes; --summarize pairs them")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "real_data_cpu.json")
    parser.add_argument("--keep-models", type=Path, default=None, metavar="DIR",
                        help="copy (a)'s models folder (bundle, ONNX, meta) here, to score it again later")
    parser.add_argument("--summarize", type=Path, nargs="+", metavar="RESULT",
                        help="print the mean over these result files (one a seed) instead of training")
    parser.add_argument("--rescore", type=Path, nargs="+", metavar="MODELS_DIR",
                        help="score kept models folders on --data's test split, served with their own views and with "
                             "--side-rotations, instead of training")
    parser.add_argument("--side-rotations", type=float, nargs="*", default=DEFAULT_SIDE_ROTATIONS, metavar="DEG",
                        help="test-time views of the side score and of --rescore (default: none, one view)")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    if args.summarize:
        print(json.dumps(summarize([json.loads(path.read_text(encoding="utf-8")) for path in args.summarize]),
                         indent=2))
        return
    if args.rescore:
        print(json.dumps(rescore(args.rescore, args.data, args.side_rotations), indent=2))
        return
    commit = _commit()  # now: the code this run imports, before anyone edits the tree during the run
    device = select_device(args.device)
    prefix = data.local_prefix(args.data, None)
    seeded = [f"seed={args.seed}"] if args.seed is not None else []
    recipe = None
    with tempfile.TemporaryDirectory(prefix="real-data-") as scratch:
        if args.skip_pipeline:  # (b) still takes the pipeline's augmentation strengths
            write_params(Path(scratch) / "params.yaml", ["profile=full", *seeded, *args.changes])
        else:
            recipe = pipeline_recipe(args.data, args.epochs, Path(scratch), device.type, [*seeded, *args.changes],
                                     args.side_rotations)
        settings = load_settings(Path(scratch) / "params.yaml")
        if recipe is not None and args.keep_models is not None:
            shutil.copytree(settings.path("models"), args.keep_models, dirs_exist_ok=True)
    plain = None
    if not args.skip_plain:
        official_train, official_test = (data.LabeledImages(*_official_split(args.data, prefix, split))
                                         for split in ("train", "test"))
        num_classes = len(load_classmap(args.data / official_file_names(prefix)["classmap"]))
        plain = plain_loop(official_train, official_test, num_classes, args.plain_epochs or args.epochs,
                           settings.augment, device, PLAIN_SEED if args.seed is None else args.seed,
                           fast=args.plain_fast)
    result = {
        "data": str(args.data),
        "epochs": args.epochs,
        "plain_epochs": args.plain_epochs or args.epochs,
        "seed": args.seed,
        "pipeline_changes": args.changes,
        "commit": commit,
        "recipe": settings.run_identity("model", "augment", "train"),
        "pipeline_full_recipe": recipe,
        "plain_loop": plain,
        "pipeline_minus_plain_points": (round(100 * (recipe["test_balanced_accuracy"]
                                                     - plain["test_balanced_accuracy"]), 2)
                                        if recipe and plain else None),
        "machine": {"cpu": cpu_model_name(), "cores": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
