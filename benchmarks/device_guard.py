"""Run a module with only the imports the GPU machine's image can satisfy, so a missing package fails here.

The image (``/work/.library/device/KINDS.md``, ``nvidia-h200``, read 2026-11-17) holds the distributions in
:data:`IMAGE_DISTRIBUTIONS`; what else the check needs travels as wheels (:data:`WHEELS_FILE`, fetched by
``make device-wheels``). Any other third-party import is refused with a message naming its distribution.

    python -m benchmarks.device_guard benchmarks.train_throughput --device cpu ...
    python -m benchmarks.device_guard --wheels FILE MODULE ...   # another list of carried wheels
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import re
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WHEELS_FILE = Path(__file__).resolve().parent / "device_wheels.txt"
PROJECT_PACKAGES = frozenset({"benchmarks", "pipeline", "serving", "flows", "launcher", "tests"})
# Distributions installed on the GPU image ('cuda'), as KINDS.md lists them.
_IMAGE_LIST = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn
scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
"""
IMAGE_DISTRIBUTIONS = frozenset(_IMAGE_LIST.split())
# Loaded by the interpreter or pip's machinery before any check code runs; never a project dependency.
ALWAYS_ALLOWED = frozenset({"_distutils_hack", "__editable___kuzushiji_pipeline_0_1_0_finder", "sitecustomize",
                            "usercustomize"})


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_wheels(path: Path = WHEELS_FILE) -> dict[str, str]:
    """``{distribution: version}`` of the wheels the check carries (``NAME==VERSION`` lines, # comments)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalize(name)] = version.strip()
    return pins


class ImageOnlyFinder(importlib.abc.MetaPathFinder):
    """Refuses a top-level import whose distribution is neither on the image nor carried."""

    def __init__(self, allowed: frozenset[str]) -> None:
        self.allowed = allowed
        self.owners = {name: [normalize(d) for d in dists]
                       for name, dists in importlib.metadata.packages_distributions().items()}
        self.refused: list[str] = []

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        top = fullname.partition(".")[0]
        if "." in fullname or top in sys.stdlib_module_names or top in PROJECT_PACKAGES or top in ALWAYS_ALLOWED:
            return None  # submodules follow their top-level package, which was checked when it was imported
        owners = self.owners.get(top)
        if owners is None or any(owner in self.allowed for owner in owners):
            return None  # not installed at all (the normal ImportError follows) or on the image / carried
        self.refused.append(top)
        raise ModuleNotFoundError(
            f"{top!r} (distribution {', '.join(owners)}) is not on the GPU machine's image and is not carried: "
            f"import it lazily where the check does not reach, or add its wheel to {WHEELS_FILE.name}",
            name=top)


def install(wheels: Path = WHEELS_FILE) -> ImageOnlyFinder:
    """Put the guard first on ``sys.meta_path``; modules already imported stay (only this file's stdlib)."""
    finder = ImageOnlyFinder(IMAGE_DISTRIBUTIONS | frozenset(carried_wheels(wheels)))
    sys.meta_path.insert(0, finder)
    return finder


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    wheels = WHEELS_FILE
    if args[:1] == ["--wheels"] and len(args) > 1:
        wheels, args = Path(args[1]), args[2:]
    if not args:
        raise SystemExit("usage: python -m benchmarks.device_guard [--wheels FILE] MODULE [ARG ...]")
    finder = install(wheels)
    sys.argv = list(args)
    try:
        runpy.run_module(args[0], run_name="__main__", alter_sys=True)
    finally:
        if finder.refused:  # also those a module caught as optional: on the image they are absent too
            print(f"device_guard: refused {sorted(set(finder.refused))}", file=sys.stderr)


if __name__ == "__main__":
    main()
