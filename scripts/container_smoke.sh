#!/usr/bin/env bash
# Build the service's container image with `bentoml containerize`, run it, and check real answers.
#
#   scripts/container_smoke.sh [options]
#
# Steps: `bentoml build` (the project's bentofile.yaml; a derived copy when another base image is asked
# for), `bentoml containerize`, `<engine> run` on 127.0.0.1:<free port>, wait for /readyz, then one
# /predict and one /predict_batch request with images rendered from K49 characters, checked against the
# same model run here with ONNX Runtime (scripts/container_check.py). The container is always stopped and
# removed, whatever happens. The model is the one in the current BentoML store ($BENTOML_HOME), put there
# by the package stage (`make run DATASET=synthetic`).
#
# Options (defaults suit a machine with Docker or Podman that can pull public images):
#   --model TAG          BentoML model to serve (default: <serve.bento_model>:latest)
#   --image NAME[:TAG]   tag of the built image (default: the bento's tag)
#   --engine ENGINE      podman | docker (default: podman when installed, else docker)
#   --base-image IMAGE   build on IMAGE instead of BentoML's default (python:3.11-slim)
#   --local-base         build on a Debian base made here from Debian packages (scripts/container_base.sh;
#                        reused when it exists): for hosts that cannot pull from a container registry
#   --ca-mount DIR       mount DIR read-only at /etc/ssl/certs during the build (a TLS-intercepting proxy
#                        whose CA is in the host's bundle)
#   --host-network       build with the host's network (--opt network=host)
#   --podman-conf FILE   export CONTAINERS_CONF=FILE (podman settings without editing system files)
#   --restricted-host    all four for hosts like the project's CI: --local-base --ca-mount /etc/ssl/certs
#                        --host-network --podman-conf scripts/podman/containers.conf
#                        (also on when KUZUSHIJI_RESTRICTED_HOST=1)
#   --port N             host port on 127.0.0.1 (default: a free one)
#   --ready-timeout S    seconds to wait for /readyz (default 300)
#   --report FILE        write a JSON report (image size, build seconds, time to ready, check summary)
#   --remove-image       remove the image after the check (default: keep it)
#   -h, --help           this text
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPTS="$ROOT/scripts"
CONTAINER_PORT=3000               # BentoML's serving port inside the image
READY_POLL_S=1

MODEL="" IMAGE="" ENGINE="${CONTAINER_ENGINE:-}" BASE_IMAGE="" LOCAL_BASE=0 CA_DIR="" HOST_NETWORK=0
PODMAN_CONF="" PORT="" READY_TIMEOUT=300 REPORT="" REMOVE_IMAGE=0
[[ "${KUZUSHIJI_RESTRICTED_HOST:-0}" == 1 ]] && RESTRICTED=1 || RESTRICTED=0

usage() { sed -n '2,/^set -Eeuo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
log() { echo "container_smoke: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) need_value "$@"; MODEL="$2"; shift 2 ;;
    --image) need_value "$@"; IMAGE="$2"; shift 2 ;;
    --engine) need_value "$@"; ENGINE="$2"; shift 2 ;;
    --base-image) need_value "$@"; BASE_IMAGE="$2"; shift 2 ;;
    --local-base) LOCAL_BASE=1; shift ;;
    --ca-mount) need_value "$@"; CA_DIR="$2"; shift 2 ;;
    --host-network) HOST_NETWORK=1; shift ;;
    --podman-conf) need_value "$@"; PODMAN_CONF="$2"; shift 2 ;;
    --restricted-host) RESTRICTED=1; shift ;;
    --port) need_value "$@"; PORT="$2"; shift 2 ;;
    --ready-timeout) need_value "$@"; READY_TIMEOUT="$2"; shift 2 ;;
    --report) need_value "$@"; REPORT="$2"; shift 2 ;;
    --remove-image) REMOVE_IMAGE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

if [[ "$RESTRICTED" == 1 ]]; then
  LOCAL_BASE=1 HOST_NETWORK=1
  CA_DIR="${CA_DIR:-/etc/ssl/certs}"
  PODMAN_CONF="${PODMAN_CONF:-$SCRIPTS/podman/containers.conf}"
fi
[[ "$READY_TIMEOUT" =~ ^[0-9]+$ ]] || die "--ready-timeout must be a whole number of seconds, got '$READY_TIMEOUT'"
[[ -z "$PORT" || "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
[[ -z "$CA_DIR" || -d "$CA_DIR" ]] || die "--ca-mount: '$CA_DIR' is not a directory"
[[ "$LOCAL_BASE" == 0 || -z "$BASE_IMAGE" ]] || die "--local-base and --base-image exclude each other"

# The project's environment: bentoml and python from .venv when it exists (make venv), else from PATH.
if [[ -x "$ROOT/.venv/bin/python" ]]; then
  PYTHON="$ROOT/.venv/bin/python" BENTOML="$ROOT/.venv/bin/bentoml"
else
  PYTHON="$(command -v python3 || true)" BENTOML="$(command -v bentoml || true)"
fi
[[ -n "$PYTHON" && -x "$BENTOML" ]] || die "bentoml not found: run \`make venv\` first"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export BENTOML_DO_NOT_TRACK="${BENTOML_DO_NOT_TRACK:-True}"   # no usage pings from builds and checks

if [[ -z "$ENGINE" ]]; then
  if command -v podman >/dev/null; then ENGINE=podman; elif command -v docker >/dev/null; then ENGINE=docker; fi
fi
case "$ENGINE" in
  podman|docker) command -v "$ENGINE" >/dev/null || die "$ENGINE is not installed" ;;
  "") die "neither podman nor docker is installed (Debian/Ubuntu: apt-get install -y podman runc)" ;;
  *) die "--engine must be podman or docker, got '$ENGINE'" ;;
esac
if [[ -n "$PODMAN_CONF" ]]; then
  [[ -f "$PODMAN_CONF" ]] || die "--podman-conf: '$PODMAN_CONF' not found"
  export CONTAINERS_CONF="$(cd "$(dirname "$PODMAN_CONF")" && pwd)/$(basename "$PODMAN_CONF")"
fi

now() { echo "${EPOCHREALTIME:-$(date +%s)}"; }   # bash 5 has sub-second time
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kuzushiji-container.XXXXXX")"   # outside the bento build context
CONTAINER="kuzushiji-smoke-$$-$RANDOM"
STARTED=0
cleanup() {
  local status=$?
  if [[ "$STARTED" == 1 ]]; then
    if [[ "$status" != 0 ]]; then
      log "container log (last 60 lines):"
      "$ENGINE" logs --tail 60 "$CONTAINER" >&2 2>&1 || true
    fi
    "$ENGINE" stop -t 10 "$CONTAINER" >/dev/null 2>&1 || true
    "$ENGINE" rm -f "$CONTAINER" >/dev/null 2>&1 || true
    log "stopped and removed container $CONTAINER"
  fi
  if [[ "$REMOVE_IMAGE" == 1 && -n "$IMAGE" ]] && "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
    "$ENGINE" rmi -f "$IMAGE" >/dev/null 2>&1 || true
    log "removed image $IMAGE"
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$ROOT"

# 1. The model: the store must hold it, or there is nothing to serve.
if [[ -z "$MODEL" ]]; then
  MODEL="$("$PYTHON" -c 'from pipeline.config import load_settings; print(load_settings().serve.bento_model)'):latest"
fi
if ! MODEL_TAG="$("$BENTOML" models get "$MODEL" -o json 2>/dev/null | "$PYTHON" -c 'import json,sys; m = json.load(sys.stdin); print(m["name"] + ":" + m["version"])' 2>/dev/null)"; then
  die "BentoML model '$MODEL' is not in the store (BENTOML_HOME=${BENTOML_HOME:-~/bentoml}): run \`make run DATASET=synthetic\` (its package stage imports the registry champion) or pass --model TAG"
fi
log "model $MODEL_TAG"
export KUZUSHIJI_BENTO_MODEL="$MODEL_TAG"   # service.py packs exactly this model into the bento

[[ -f bentofile.yaml ]] || die "$ROOT/bentofile.yaml not found: the service's build options are missing"

# 2. The base image.
if [[ "$LOCAL_BASE" == 1 ]]; then
  BASE_IMAGE="${KUZUSHIJI_BASE_IMAGE:-localhost/kuzushiji/debian-python:bookworm}"
  [[ "$ENGINE" == podman ]] || die "--local-base needs podman (it imports a debootstrap root filesystem)"
  base_started="$(now)"
  KUZUSHIJI_BASE_IMAGE="$BASE_IMAGE" "$SCRIPTS/container_base.sh"
  log "base image ready in $(seconds_since "$base_started") s"
fi
BENTOFILE=bentofile.yaml
if [[ -n "$BASE_IMAGE" ]]; then
  BENTOFILE="$WORK/bentofile.yaml"
  "$PYTHON" "$SCRIPTS/container_check.py" bentofile --base-image "$BASE_IMAGE" --out "$BENTOFILE" >/dev/null
  log "building on base image $BASE_IMAGE ($BENTOFILE)"
fi

# 3. bentoml build + containerize.
build_started="$(now)"
BENTO_TAG="$("$BENTOML" build -f "$BENTOFILE" -o tag "$ROOT" | sed -n 's/^__tag__://p' | tail -n 1)"
[[ -n "$BENTO_TAG" ]] || die "bentoml build did not report a bento tag"
BUILD_S="$(seconds_since "$build_started")"
log "built bento $BENTO_TAG in $BUILD_S s"
IMAGE="${IMAGE:-$BENTO_TAG}"

build_opts=()
[[ "$HOST_NETWORK" == 1 ]] && build_opts+=(--opt network=host)
[[ -n "$CA_DIR" ]] && build_opts+=(--opt "volume=$CA_DIR:/etc/ssl/certs:ro")
containerize_started="$(now)"
if ! "$BENTOML" containerize "$BENTO_TAG" --backend "$ENGINE" --image-tag "$IMAGE" ${build_opts[@]+"${build_opts[@]}"}; then
  IMAGE=""   # nothing was tagged: nothing to remove
  die "bentoml containerize failed (output above). A host that cannot pull ${BASE_IMAGE:-python:3.11-slim} \
needs --local-base; TLS errors from pip/uv behind a proxy need --ca-mount /etc/ssl/certs; apt errors need \
--host-network; podman runtime/cgroup errors need --podman-conf (--restricted-host sets all four)"
fi
CONTAINERIZE_S="$(seconds_since "$containerize_started")"
IMAGE_SIZE="$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")"
log "image $IMAGE: $IMAGE_SIZE bytes, containerized in $CONTAINERIZE_S s"

# 4. Run it on loopback and wait until it is ready.
PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
URL="http://127.0.0.1:$PORT"
run_started="$(now)"
STARTED=1
"$ENGINE" run -d --name "$CONTAINER" -p "127.0.0.1:$PORT:$CONTAINER_PORT" "$IMAGE" >/dev/null
deadline=$(( SECONDS + READY_TIMEOUT ))
until curl -fsS -o /dev/null "$URL/readyz" 2>/dev/null; do
  running="$("$ENGINE" inspect --format '{{.State.Running}}' "$CONTAINER" 2>/dev/null || echo false)"
  [[ "$running" == true ]] || die "the container exited before $URL/readyz answered"
  (( SECONDS < deadline )) || die "$URL/readyz did not answer within $READY_TIMEOUT s"
  sleep "$READY_POLL_S"
done
READY_S="$(seconds_since "$run_started")"
log "ready at $URL in $READY_S s"

# 5. Real requests, checked against the model run here.
SUMMARY="$("$PYTHON" "$SCRIPTS/container_check.py" check --url "$URL" --model "$MODEL_TAG")"
log "answers OK: $SUMMARY"

RESULT="$("$PYTHON" -c '
import json, sys
image, bento, model, engine, base, size, build_s, containerize_s, ready_s, summary = sys.argv[1:]
print(json.dumps({
    "image": image, "bento": bento, "model": model, "engine": engine, "base_image": base,
    "image_size_bytes": int(size), "image_size_mb": round(int(size) / 1e6, 1),
    "bento_build_s": float(build_s), "containerize_s": float(containerize_s),
    "time_to_ready_s": float(ready_s), "check": json.loads(summary),
}, ensure_ascii=False))' "$IMAGE" "$BENTO_TAG" "$MODEL_TAG" "$ENGINE" "${BASE_IMAGE:-bentoml default}" \
  "$IMAGE_SIZE" "$BUILD_S" "$CONTAINERIZE_S" "$READY_S" "$SUMMARY")"
if [[ -n "$REPORT" ]]; then
  mkdir -p "$(dirname "$REPORT")"
  echo "$RESULT" > "$REPORT"
fi
echo "$RESULT"
