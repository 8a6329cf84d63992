"""ONNX export: the graph reproduces PyTorch, the batch axis is dynamic, a bad export never lands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.contract import ONNX_INPUT, ONNX_OUTPUT, onnx_session
from pipeline.export import VERIFY_ATOL, ExportError, export_onnx
from pipeline.model import SpinalVGG

NUM_CLASSES = 7


def small_model(seed: int = 0) -> SpinalVGG:
    torch.manual_seed(seed)
    model = SpinalVGG(NUM_CLASSES, spinal_width=8, dropout=0.5, pixel_mean=0.2, pixel_std=0.3)
    return model.eval()


def raw_pixels(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, 1, 28, 28)).astype(np.float32)


class NoisyModel(torch.nn.Module):
    """Adds fresh random noise on every call, so no export can reproduce it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(28 * 28, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x.flatten(1) / 255.0)
        return logits + torch.rand_like(logits)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[SpinalVGG, Path]:
    model = small_model()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert export_onnx(model, path, raw_pixels(1)) == path  # batch of 1 must still give a dynamic axis
    return model, path


@pytest.mark.parametrize("batch", [1, 5, 33])
def test_onnx_matches_pytorch(exported: tuple[SpinalVGG, Path], batch: int) -> None:
    model, path = exported
    images = raw_pixels(batch, seed=batch)
    session = onnx_session(path)
    assert [node.name for node in session.get_inputs()] == [ONNX_INPUT]
    assert [node.name for node in session.get_outputs()] == [ONNX_OUTPUT]
    (actual,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: images})
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    assert actual.shape == (batch, NUM_CLASSES)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=VERIFY_ATOL)


def test_export_leaves_no_temp_files(exported: tuple[SpinalVGG, Path]) -> None:
    _, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_mismatch_is_refused_and_keeps_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous good export")
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(NoisyModel().eval(), path, raw_pixels(4))
    assert path.read_bytes() == b"previous good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_bad_example_shape_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"\(N, 1, H, W\)"):
        export_onnx(small_model(), tmp_path / "model.onnx", np.zeros((4, 28, 28), np.float32))
    assert not (tmp_path / "model.onnx").exists()
