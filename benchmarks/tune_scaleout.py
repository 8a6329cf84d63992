"""Tuning throughput on PostgreSQL storage: trials a minute with 1 and then 2 worker processes on one study.

Each configuration gets a fresh database on a throw-away PostgreSQL server (tests/postgres.py: Debian's
binaries, a free loopback port) and runs the real tune stage, ``python -m pipeline.stages.tune --workers N``,
with ``tune.storage: postgresql://...`` (password through PGPASSWORD) on the same tiny synthetic data.
Pruning is off so every trial does the same work (``tune.epochs`` epochs on the same subset);
``pipeline.stages.tune`` gives each of N workers cores // N torch threads, as it always does.

Reported per configuration: the wall time of the whole command (process start-up, data loading and the
study's MLflow bookkeeping included) and the trial window (first trial start to last trial end, from
the study itself), each as finished trials a minute. Also the coordination ceiling of the storage: how
many no-op trials a minute three processes can ask/tell through it, which bounds what more workers could
add once there are cores for them.

    python -m benchmarks.tune_scaleout                       # 1 and 2 workers, 6 trials each
    python -m benchmarks.tune_scaleout --trials 8 --epochs 2 --out benchmarks/results/tune_scaleout.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna

from benchmarks.train_throughput import cpu_model_name
from pipeline.config import PROJECT_ROOT, load_settings
from pipeline.stages import download, prepare
from pipeline.tuning.study import FINISHED, OWNER_ATTR, open_storage
from tests.postgres import PostgresServer, database_name, running_postgres
from tests.prefect_server import write_tiny_params

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NO_PRUNING = 10_000  # MedianPruner startup trials: more than any run here, so no trial is ever pruned
CEILING_PROCESSES = 3
CEILING_TRIALS_PER_PROCESS = 40


def _params(folder: Path, args: argparse.Namespace, storage: str, data_paths: dict[str, str]) -> Path:
    return write_tiny_params(folder, {
        **data_paths,
        "tune.storage": storage,
        "tune.n_trials": args.trials,
        "tune.epochs": args.epochs,
        "tune.max_train_per_class": args.train_per_class,
        "tune.max_val_per_class": args.val_per_class,
        "tune.pruner_startup_trials": NO_PRUNING,
        # Enough generated images that the 10% validation split and the training subset are both full.
        "data.synthetic.train_per_class": max(10 * args.val_per_class, args.train_per_class * 10 // 9 + 2),
    })


def measure_workers(server: PostgresServer, workers: int, args: argparse.Namespace, work: Path,
                    data_paths: dict[str, str]) -> dict[str, Any]:
    """One run of the tune stage with ``workers`` processes on a fresh PostgreSQL study."""
    database = server.create_database(database_name(f"bench_{workers}_workers"))
    try:
        folder = work / f"workers-{workers}"
        params = _params(folder, args, server.url_without_password(database), data_paths)
        # MLflow on the run's own SQLite store: the study's storage is what is measured here.
        env = {**os.environ, "KUZUSHIJI_PARAMS": str(params), "PGPASSWORD": server.password,
               "MLFLOW_TRACKING_URI": ""}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        load = os.getloadavg()
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pipeline.stages.tune", "--workers", str(workers)], env=env,
                                cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
        wall_s = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"tune with {workers} workers failed:\n{result.stderr[-3000:]}")
        os.environ["PGPASSWORD"] = server.password
        settings = load_settings(params)
        (name,) = optuna.get_all_study_names(open_storage(settings))
        trials = optuna.load_study(study_name=name, storage=open_storage(settings)).get_trials()
        finished = [t for t in trials if t.state in FINISHED]
        window_s = (max(t.datetime_complete for t in finished)
                    - min(t.datetime_start for t in finished)).total_seconds()
        owners = {t.user_attrs[OWNER_ATTR]["pid"] for t in finished}
        return {
            "workers": workers,
            "torch_threads_per_worker": args.threads or max(1, (os.cpu_count() or 1) // workers),
            "trials_finished": len(finished),
            "trials_failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
            "processes_that_ran_trials": len(owners),
            "wall_s": round(wall_s, 1),
            "trial_window_s": round(window_s, 1),
            "trials_per_min_wall": round(60 * len(finished) / wall_s, 2),
            "trials_per_min_window": round(60 * len(finished) / window_s, 2),
            "mean_trial_s": round(sum((t.datetime_complete - t.datetime_start).total_seconds()
                                      for t in finished) / len(finished), 1),
            "load_average_before": [round(value, 2) for value in load],
            "load_average_after": [round(value, 2) for value in os.getloadavg()],
        }
    finally:
        server.drop_database(database)


def _noop_trials(url: str, study_name: str, count: int) -> None:
    study = optuna.load_study(study_name=study_name, storage=optuna.storages.RDBStorage(url))
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=count)


def measure_storage_ceiling(server: PostgresServer) -> dict[str, Any]:
    """No-op trials a minute that several processes push through one PostgreSQL study (ask, suggest, tell)."""
    database = server.create_database(database_name("bench_ceiling"))
    try:
        url = server.url(database)
        optuna.create_study(study_name="ceiling", storage=optuna.storages.RDBStorage(url))
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=_noop_trials, args=(url, "ceiling", CEILING_TRIALS_PER_PROCESS))
                     for _ in range(CEILING_PROCESSES)]
        started = time.perf_counter()
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        elapsed = time.perf_counter() - started  # includes process start-up: a lower bound on the ceiling
        total = CEILING_PROCESSES * CEILING_TRIALS_PER_PROCESS
        return {"processes": CEILING_PROCESSES, "trials": total, "seconds": round(elapsed, 1),
                "noop_trials_per_min": round(60 * total / elapsed)}
    finally:
        server.drop_database(database)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="finished trials per configuration")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial")
    parser.add_argument("--train-per-class", type=int, default=12)
    parser.add_argument("--val-per-class", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (OMP_NUM_THREADS); default: pipeline.stages.tune's cores // N")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "tune_scaleout.json")
    args = parser.parse_args(argv)

    import tempfile

    with tempfile.TemporaryDirectory(prefix="tune-scaleout-") as scratch, running_postgres() as server:
        work = args.work_dir or Path(scratch)
        data_settings = load_settings(_params(work / "data", args, "", {}))
        download.run(data_settings)
        prepare.run(data_settings)
        data_paths = {"paths.raw": str(data_settings.path("raw")),
                      "paths.prepared": str(data_settings.path("prepared"))}
        runs = [measure_workers(server, workers, args, work, data_paths) for workers in args.workers]
        ceiling = measure_storage_ceiling(server)
    import torch

    report = {
        "machine": {"cpu": cpu_model_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "optuna": optuna.__version__,
                    "postgresql": server_version()},
        "setup": {"trials": args.trials, "epochs_per_trial": args.epochs,
                  "train_images_per_class": args.train_per_class, "val_images_per_class": args.val_per_class,
                  "classes": 49, "pruning": "off"},
        "runs": runs,
        "speedup_2_vs_1_wall": _ratio(runs, "trials_per_min_wall"),
        "speedup_2_vs_1_window": _ratio(runs, "trials_per_min_window"),
        "storage_ceiling": ceiling,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


def _ratio(runs: list[dict[str, Any]], key: str) -> float | None:
    by_workers = {run["workers"]: run[key] for run in runs}
    return round(by_workers[2] / by_workers[1], 2) if {1, 2} <= set(by_workers) else None


def server_version() -> str:
    from tests.postgres import find_bindir

    bindir = find_bindir()
    if bindir is None:
        return "unknown"
    return subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True,
                          check=False).stdout.strip()


if __name__ == "__main__":
    main()
