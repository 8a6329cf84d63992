"""ONNX export (input ``images`` raw 0..255, output ``logits``, dynamic batch), checked against PyTorch
before it replaces the file, so a bad export never replaces a good one."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from pipeline.contract import ONNX_INPUT, ONNX_OUTPUT, onnx_session
from pipeline.files import atomic_path

log = logging.getLogger(__name__)

# Opset 18 is the dynamo exporter's native opset in torch 2.x and is served by every onnxruntime >= 1.14,
# so the serving image is not tied to the newest runtime.
ONNX_OPSET = 18
# Largest absolute logit difference accepted between ONNX Runtime and PyTorch (both float32 on CPU).
VERIFY_ATOL = 1e-4
BATCH_AXIS = "batch"
# torch.export specialises a size-1 dimension to a constant; the example is tiled to at least this
# batch so the batch axis stays symbolic in the graph.
MIN_TRACE_BATCH = 2


class ExportError(RuntimeError):
    """The ONNX export failed or does not reproduce the PyTorch model."""


def export_onnx(model: torch.nn.Module, path: Path, example: np.ndarray) -> Path:
    """Export ``model`` to ONNX at ``path``, check it with ONNX Runtime on ``example``, return ``path``.

    ``example`` is a float32 batch (N, 1, 28, 28) of raw pixel values, e.g. a few validation images.
    Raises :class:`ExportError` (and leaves any existing file at ``path`` untouched) when the graph is
    invalid, the batch axis is not dynamic or the logits differ from PyTorch by more than ``VERIFY_ATOL``.
    """
    path = Path(path)
    example = _check_example(example)
    cpu_model = copy.deepcopy(model).to("cpu").eval()  # never move the caller's (GPU) model
    trace_input = _tile_to_min_batch(example)
    try:
        with atomic_path(path) as tmp, torch.no_grad():  # replaces ``path`` only once verified
            torch.onnx.export(
                cpu_model,
                (torch.from_numpy(trace_input),),
                str(tmp),
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS, min=1)},),
                opset_version=ONNX_OPSET,
                dynamo=True,
                verbose=False,
                external_data=False,  # one self-contained file: the registry and BentoML copy it alone
            )
            onnx.checker.check_model(str(tmp), full_check=True)
            _verify(cpu_model, tmp, example)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"ONNX export to {path} failed: {type(exc).__name__}: {exc}. The model must take a float32 "
            "(N, 1, 28, 28) tensor and return (N, num_classes) logits with torch.export-compatible ops."
        ) from exc
    log.info("exported ONNX model to %s (opset %d, verified atol %g)", path, ONNX_OPSET, VERIFY_ATOL)
    return path


def _check_example(example: np.ndarray) -> np.ndarray:
    array = np.asarray(example)
    if array.ndim != 4 or array.shape[1] != 1 or array.shape[0] < 1:
        raise ExportError(
            f"example must be a float32 batch shaped (N, 1, H, W) with N >= 1, got shape {array.shape}; "
            "pass e.g. images[:8].astype(np.float32)[:, None]"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def _tile_to_min_batch(example: np.ndarray) -> np.ndarray:
    if len(example) >= MIN_TRACE_BATCH:
        return example
    reps = -(-MIN_TRACE_BATCH // len(example))
    return np.concatenate([example] * reps)


def _verify(model: torch.nn.Module, onnx_path: Path, example: np.ndarray) -> None:
    session = onnx_session(onnx_path)
    names_in = [node.name for node in session.get_inputs()]
    names_out = [node.name for node in session.get_outputs()]
    if names_in != [ONNX_INPUT] or names_out != [ONNX_OUTPUT]:
        raise ExportError(f"exported graph has inputs {names_in} / outputs {names_out}, "
                          f"expected [{ONNX_INPUT!r}] / [{ONNX_OUTPUT!r}]")
    # A batch size other than the traced one proves the batch axis is really dynamic.
    probe = np.concatenate([example, example[:1]])
    with torch.no_grad():
        expected = model(torch.from_numpy(probe)).float().numpy()
    (actual,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: probe})
    if actual.shape != expected.shape:
        raise ExportError(f"ONNX output shape {actual.shape} differs from PyTorch {expected.shape} "
                          f"for a batch of {len(probe)}: the batch axis is not dynamic")
    worst = float(np.max(np.abs(actual - expected)))
    if not worst <= VERIFY_ATOL:  # also catches NaN
        raise ExportError(
            f"ONNX Runtime logits differ from PyTorch by up to {worst:.3g} (> {VERIFY_ATOL:g}) on the "
            "example batch; the export is not kept. Check for ops that behave differently in eval mode."
        )
