"""SpinalVGG as published: shapes, parameter counts, gradient flow, deterministic eval, normalising inside."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline.model import SpinalVGG, build_model, count_parameters
from pipeline.transforms import normalize

# Kabir et al. (arXiv:2007.03347) SpinalVGG with spinal width 128; the 10-class count differs only in the
# output layer: 3,649,777 - 39 * (4 * 128 + 1).
K49_PARAMETERS = 3_649_777
KMNIST_PARAMETERS = 3_629_770


@pytest.fixture(autouse=True)
def _few_threads(one_torch_thread):
    """Small tensors: one thread is faster and steadier on a shared 2-core machine."""


def raw_batch(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=generator).float()


@pytest.mark.parametrize(("classes", "expected"), [(49, K49_PARAMETERS), (10, KMNIST_PARAMETERS)])
def test_parameter_count_matches_the_paper(classes, expected):
    assert count_parameters(SpinalVGG(classes, spinal_width=128)) == expected


def test_build_model_reads_settings_and_outputs_logits_per_class(make_settings):
    settings = make_settings({"model.spinal_width": 128, "model.dropout": 0.3})
    model = build_model(settings, 49, pixel_mean=0.2, pixel_std=0.35).eval()
    assert count_parameters(model) == K49_PARAMETERS
    assert model.config() == {"num_classes": 49, "spinal_width": 128, "dropout": 0.3,
                              "pixel_mean": pytest.approx(0.2), "pixel_std": pytest.approx(0.35),
                              "temperature": 1.0, "tta_rotations_deg": []}
    with torch.no_grad():
        assert model(raw_batch(3)).shape == (3, 49)


def test_gradients_reach_every_parameter():
    model = SpinalVGG(10, spinal_width=32).train()
    loss = torch.nn.functional.cross_entropy(model(raw_batch(4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_pixel_stats_are_buffers_not_parameters():
    model = SpinalVGG(10, pixel_mean=0.2, pixel_std=0.3)
    buffers = dict(model.named_buffers())
    assert buffers["pixel_mean"].item() == pytest.approx(0.2)
    assert buffers["pixel_std"].item() == pytest.approx(0.3)
    assert "pixel_mean" in model.state_dict()
    assert all("pixel" not in name for name, _ in model.named_parameters())


def test_eval_mode_is_deterministic_and_batch_independent():
    model = SpinalVGG(49, spinal_width=32).eval()
    x = raw_batch(6)
    with torch.no_grad():
        first, second = model(x), model(x)
        single = model(x[:1])
    assert torch.equal(first, second)
    torch.testing.assert_close(single, first[:1], rtol=1e-5, atol=1e-5)


def test_forward_normalises_raw_pixels_inside():
    """Raw 0..255 into a model with stats (m, s) == pre-normalised pixels into one with stats (0, 1)."""
    raw = raw_batch(4)
    with_stats = SpinalVGG(10, spinal_width=16, pixel_mean=0.25, pixel_std=0.4).eval()
    identity = SpinalVGG(10, spinal_width=16, pixel_mean=0.0, pixel_std=1.0).eval()
    state = {k: v for k, v in with_stats.state_dict().items() if not k.startswith("pixel_")}
    identity.load_state_dict(state, strict=False)
    pre = normalize(raw, 0.25, 0.4) * 255.0  # identity model divides by 255 only
    with torch.no_grad():
        torch.testing.assert_close(with_stats(raw), identity(pre), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [{"num_classes": 1}, {"num_classes": 10, "pixel_std": 0.0}])
def test_invalid_arguments_are_rejected(bad):
    with pytest.raises(ValueError):
        SpinalVGG(**bad)


def test_a_baked_temperature_divides_the_logits_in_pytorch_onnx_and_the_bundle(tmp_path):
    """Calibration lives in the model: the bundle and the ONNX export give the same calibrated logits."""
    from pipeline.export import export_onnx
    from pipeline.training.bundle import load_bundle, save_bundle

    torch.manual_seed(0)
    model = SpinalVGG(10, spinal_width=16).eval()
    x = torch.rand(4, 1, 28, 28) * 255
    with torch.no_grad():
        raw = model(x)
        model.calibrate(2.5)
        calibrated = model(x)
    torch.testing.assert_close(calibrated, raw / 2.5)
    assert "temperature" not in model.state_dict()  # the refit's start weights and checkpoints ignore it
    loaded, _ = load_bundle(save_bundle(tmp_path / "model.pt", model, {}))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), calibrated)
    path = export_onnx(model, tmp_path / "model.onnx", x.numpy())  # verified against PyTorch inside
    from pipeline.contract import onnx_session

    (onnx_logits,) = onnx_session(path).run(["logits"], {"images": x.numpy()})
    np.testing.assert_allclose(onnx_logits, raw.numpy() / 2.5, atol=1e-4)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.calibrate(0.0)


def test_test_time_views_average_rotated_logits_in_pytorch_the_bundle_and_onnx(tmp_path):
    """TTA lives in the model: eval logits are the mean over rotated views (torchvision's rotation of each
    image), the bundle keeps the views, the ONNX graph computes the same, and training ignores them."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from pipeline.contract import onnx_session
    from pipeline.export import export_onnx
    from pipeline.training.bundle import load_bundle, save_bundle

    torch.manual_seed(0)
    model = SpinalVGG(10, spinal_width=16).eval().calibrate(2.0)
    x = raw_batch(3)
    angles = [-6.0, 0.0, 6.0]
    with torch.no_grad():
        alone = model(x)
        expected = sum(model(F.rotate(x, a, interpolation=InterpolationMode.BILINEAR)) for a in angles) / 3
        model.set_views(angles)
        averaged = model(x)
        torch.testing.assert_close(averaged, expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(averaged, alone)
        plain, viewed = copy.deepcopy(model).set_views([]).train(), copy.deepcopy(model).train()
        torch.manual_seed(1)
        trained_plain = plain(x)
        torch.manual_seed(1)  # the same dropout masks
        torch.testing.assert_close(viewed(x), trained_plain)  # training sees the batch as it is
        assert model.set_views([0.0]) is model
        torch.testing.assert_close(model(x), alone, atol=1e-5, rtol=1e-4)  # one unrotated view = no TTA
    model.set_views(angles)
    loaded, meta = load_bundle(save_bundle(tmp_path / "model.pt", model, {}))
    assert loaded.tta_rotations_deg == tuple(angles) and meta["model"]["tta_rotations_deg"] == angles
    path = export_onnx(loaded, tmp_path / "model.onnx", x.numpy())  # verified against PyTorch inside
    (onnx_logits,) = onnx_session(path).run(["logits"], {"images": x[:1].numpy()})
    np.testing.assert_allclose(onnx_logits, averaged[:1].numpy(), atol=1e-4)
    assert "view_grids" not in model.state_dict()  # checkpoints and the refit's start weights ignore them
