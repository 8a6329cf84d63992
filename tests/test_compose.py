"""compose.yaml, checked without starting it: against the Compose schema (Debian's docker-compose, which
validates offline), and as podman-compose (pinned in the lock; what `make stack-up` runs) resolves it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import PROJECT_ROOT

COMPOSE_FILE = PROJECT_ROOT / "compose.yaml"
SERVICES = {"postgres", "mlflow", "prefect-server", "worker", "service"}
# Variables every address and secret of the stack comes from (each has a local default in the file).
OVERRIDES = {
    "POSTGRES_USER": "team",
    "POSTGRES_PASSWORD": "s3cret-from-env",
    "STACK_BIND": "0.0.0.0",
    "POSTGRES_PORT": "15432",
    "MLFLOW_PORT": "15000",
    "PREFECT_PORT": "14200",
    "SERVICE_PORT": "13000",
    "WORKER_PREFECT_API_URL": "http://prefect.internal:4200/api",
    "WORKER_MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
    "PREFECT_UI_API_URL": "http://stack.internal:14200/api",
    "KUZUSHIJI_SERVICE_IMAGE": "registry.internal/kuzushiji:7",
    "KUZUSHIJI_PROJECT_DIR": "/srv/kuzushiji",
}


def _resolved(extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml as podman-compose resolves it (variables filled in, every profile)."""
    env = {key: value for key, value in os.environ.items() if key not in OVERRIDES}
    command = [str(Path(sys.executable).parent / "podman-compose"), "-f", str(COMPOSE_FILE),
               "--profile", "serve", "--dry-run", "config"]
    result = subprocess.run(command, env={**env, **(extra_env or {})}, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_is_valid_against_the_compose_schema() -> None:
    validator = shutil.which("docker-compose")
    if validator is None:
        reason = "docker-compose (Debian's package, validates compose files offline) is not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}: .ci/run installs it", pytrace=False)
        pytest.skip(f"{reason}: apt-get install docker-compose")
    result = subprocess.run([validator, "-f", str(COMPOSE_FILE), "--profile", "serve", "config", "-q"],
                            capture_output=True, text=True, timeout=120, check=False, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_is_health_checked_and_keeps_state_in_named_volumes() -> None:
    config = _resolved()
    services = config["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
    assert services["service"]["profiles"] == ["serve"]  # built by `bentoml containerize` after a champion
    assert {"postgres-data", "mlflow-artifacts"} <= set(config["volumes"])
    mounts = {name: [str(volume).split(":")[0] for volume in service.get("volumes", [])]
              for name, service in services.items()}
    assert "postgres-data" in mounts["postgres"] and "mlflow-artifacts" in mounts["mlflow"]
    # The servers run the image the worker builds from this project: one lock, one set of versions.
    assert services["worker"]["build"]["dockerfile"] == "docker/worker.Containerfile"
    assert services["mlflow"]["image"] == services["prefect-server"]["image"] == services["worker"]["image"]
    assert "--serve-artifacts" in services["mlflow"]["command"]
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")


def test_addresses_and_secrets_come_from_the_environment() -> None:
    defaults = _resolved()
    assert defaults["services"]["postgres"]["ports"] == ["127.0.0.1:5432:5432"]  # local unless told otherwise
    config = _resolved(OVERRIDES)
    services = config["services"]
    text = yaml.safe_dump(config)
    assert "kuzushiji@" not in text and ":kuzushiji@" not in text  # no default user or password left
    password = OVERRIDES["POSTGRES_PASSWORD"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == password
    assert services["mlflow"]["environment"]["PGPASSWORD"] == password
    assert services["worker"]["environment"]["PGPASSWORD"] == password
    assert f":{password}@postgres:5432/prefect" in services["prefect-server"]["environment"][
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert "postgresql://team@postgres:5432/mlflow" in services["mlflow"]["command"]
    assert services["worker"]["environment"]["PREFECT_API_URL"] == OVERRIDES["WORKER_PREFECT_API_URL"]
    assert services["worker"]["environment"]["MLFLOW_TRACKING_URI"] == OVERRIDES["WORKER_MLFLOW_TRACKING_URI"]
    assert services["prefect-server"]["environment"]["PREFECT_UI_API_URL"] == OVERRIDES["PREFECT_UI_API_URL"]
    assert services["service"]["image"] == OVERRIDES["KUZUSHIJI_SERVICE_IMAGE"]
    # The worker sees the checkout at the path deployments registered from it change into.
    assert services["worker"]["working_dir"] == "/srv/kuzushiji"
    assert "/srv/kuzushiji:/srv/kuzushiji" in services["worker"]["volumes"]
    ports = {name: service["ports"][0] for name, service in services.items() if "ports" in service}
    assert ports == {"postgres": "0.0.0.0:15432:5432", "mlflow": "0.0.0.0:15000:5000",
                     "prefect-server": "0.0.0.0:14200:4200", "service": "0.0.0.0:13000:3000"}
