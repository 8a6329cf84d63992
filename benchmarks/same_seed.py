"""Train + evaluate on kmnist-dev at one seed and write the metrics: run it on two commits, compare the files.

Usage: ``PYTHONPATH=<checkout> python benchmarks/same_seed.py OUT.json`` (it imports the checkout given).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.config import load_settings, write_params

try:  # the layout since the restructure, then the one before it
    from pipeline.stages import download, evaluate, prepare, train, tune
except ImportError:
    from pipeline import download, evaluate, prepare, train, tune  # type: ignore[no-redef,attr-defined]

KMNIST_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kmnist-dev"
SETTINGS = {"profile": "cpu", "data.dataset": "local", "data.local_dir": str(KMNIST_DEV), "tune.n_trials": 0,
            "train.device": "cpu", "train.epochs": 2, "train.refit_epochs_fraction": 0.5, "seed": 7}


def main(out: Path) -> dict:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    settings = load_settings(write_params(root / "params.yaml", SETTINGS))
    download.run(settings)
    prepare.run(settings)
    tune.run(settings)
    trained = train.run(settings)
    tested = evaluate.run(settings)
    result = {"test": {key: tested[key] for key in ("test_balanced_accuracy", "test_accuracy")},
              "best_val_balanced_accuracy": trained["best_val_balanced_accuracy"],
              "best_epoch": trained["best_epoch"]}
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
