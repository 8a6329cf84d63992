"""The ``pipeline`` flow (``make run`` and the deployment): ``dvc exp run`` with the run's ``-S`` values
(validated first, so a bad value changes nothing; the profile chosen as ``make run`` chooses it), the stage
flow runs beneath it, and the run summary as its artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_client, get_run_logger
from prefect.runtime import flow_run

from flows.artifacts import publish_summary
from flows.stages import PARENT_RUN_ENV
from launcher.summary import summary_lines
from pipeline import profiles
from pipeline.config import PROJECT_ROOT, apply_dotted, load_settings

PARAMS_FILE = "params.yaml"
NO_HASH_WARNING = "No file hash info found"  # DVC's checkout on a first `dvc exp run`: one per output


class PipelineError(RuntimeError):
    """DVC failed; the message carries the tail of its output."""


def dvc_set_args(dataset: str | None, profile: str | None, set_params: dict[str, Any] | None) -> dict[str, Any]:
    """The ``-S key=value`` assignments of one run (None = keep params.yaml's value)."""
    values: dict[str, Any] = dict(set_params or {})
    if dataset is not None:
        values["data.dataset"] = dataset
    if profile is not None:
        values["profile"] = profile
    return values


def validate_assignments(project_dir: Path, values: dict[str, Any]) -> None:
    """Load params.yaml with ``values`` applied (profile overlay included) or raise ConfigError."""
    raw = yaml.safe_load((project_dir / PARAMS_FILE).read_text(encoding="utf-8"))
    apply_dotted(raw, values, source="-S")
    with tempfile.TemporaryDirectory() as folder:
        candidate = Path(folder) / PARAMS_FILE
        candidate.write_text(yaml.safe_dump(raw), encoding="utf-8")
        load_settings(candidate)


def _params_dataset(project_dir: Path) -> str:
    raw = yaml.safe_load((project_dir / PARAMS_FILE).read_text(encoding="utf-8")) or {}
    return str(raw.get("data", {}).get("dataset"))


def choose_profile(project_dir: Path, dataset: str | None, profile: str | None) -> tuple[str, str]:
    """(profile, why), as ``make run`` chooses (pipeline.profiles): a given one wins, else by dataset and GPU."""
    dataset = dataset or _params_dataset(project_dir)
    check_gpu = dataset != profiles.SMOKE_DATASET and profile in (None, profiles.GPU_PROFILE)
    return profiles.choose_profile(dataset, profile, profiles.gpu_status() if check_gpu else (False, "not checked"))


def _stream(command: list[str], cwd: Path, env: dict[str, str]) -> list[str]:
    logger = get_run_logger()
    lines: list[str] = []
    unhashed = 0
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            lines.append(line)
            if NO_HASH_WARNING in line:  # one line for all of them, below
                unhashed += 1
                continue
            if unhashed:
                logger.info("DVC: %d outputs have no hash yet (first run in this clone): expected", unhashed)
                unhashed = 0
            logger.info("%s", line)
    if process.returncode != 0:
        tail = "\n".join(lines[-40:])
        raise PipelineError(f"`{' '.join(command)}` failed with exit code {process.returncode}:\n{tail}")
    return lines


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _name_this_run(dataset: str, profile: str) -> None:
    """``synthetic · quick``: the flow run says what ran (the profile is known only once chosen)."""
    if run_id := flow_run.get_id():
        with get_client(sync_client=True) as client:
            client.set_flow_run_name(uuid.UUID(str(run_id)), f"{dataset} · {profile}")


@flow(name="pipeline", log_prints=True)
def pipeline(
    dataset: str | None = None,
    profile: str | None = None,
    set_params: dict[str, Any] | None = None,
    force: bool = False,
    stream_to_log: bool = True,
) -> dict[str, Any]:
    """Run every stage that is out of date through ``dvc exp run`` and return the key results.

    ``dataset`` (k49 | kmnist | local | synthetic) and ``profile`` (full | cpu | quick; none: chosen like
    ``make run``) set those params; more ``set_params`` (dotted key -> value) are passed as extra ``-S``;
    ``force`` re-runs every stage. ``stream_to_log``: DVC's output goes to the run log (else to the terminal).
    """
    logger = get_run_logger()
    profile, why = choose_profile(PROJECT_ROOT, dataset, profile)
    logger.info("profile %s (%s)", profile, why)
    _name_this_run(dataset or _params_dataset(PROJECT_ROOT), profile)
    values = dvc_set_args(dataset, profile, set_params)
    validate_assignments(PROJECT_ROOT, values)
    if note := profiles.run_time_note(load_settings(PROJECT_ROOT / PARAMS_FILE, overrides=values)):
        logger.warning("%s", note)
    command = [sys.executable, "-m", "dvc", "exp", "run"]
    for key, value in values.items():
        command += ["-S", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    if force:
        command.append("--force")
    env = {
        **os.environ,
        # Stage commands say `python`: make it this interpreter whatever PATH the worker has.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PARENT_RUN_ENV: str(flow_run.get_id() or ""),
        # Every stage reports to the API this run reports to (even Prefect's temporary server of this
        # process), instead of each stage process starting a temporary server of its own.
        "PREFECT_API_URL": str(get_client(sync_client=True).api_url).rstrip("/"),
    }
    logger.info("running %s in %s", " ".join(command), PROJECT_ROOT)
    if stream_to_log:
        _stream(command, PROJECT_ROOT, env)
    elif (code := subprocess.run(command, cwd=PROJECT_ROOT, env=env, check=False).returncode) != 0:
        raise PipelineError(f"`{' '.join(command)}` failed with exit code {code} (its output is above)")
    settings = load_settings(PROJECT_ROOT / PARAMS_FILE)
    reports = settings.path("reports")
    summary = summary_lines(PROJECT_ROOT, prefect_ui=env["PREFECT_API_URL"].removesuffix("/api"))
    publish_summary(summary)
    return {
        "params": values,
        "eval": _read_json(reports / "eval" / "metrics.json"),
        "registry": _read_json(reports / "registry.json"),
        "bento_model": _read_json(reports / "bento_model.json"),
        "summary": summary,
    }
