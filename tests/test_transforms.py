"""Normalisation round-trips; batched augmentation moves glyphs a little, keeps them in frame, never flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import AugmentSettings, load_settings
from pipeline.transforms import BatchAugment, affine_warp, normalize

SIDE = 28


def glyph_f(size: int = 12) -> torch.Tensor:
    """A centred 'F': asymmetric left/right and top/bottom, so any mirror is obvious."""
    image = torch.zeros(SIDE, SIDE)
    top = left = (SIDE - size) // 2
    image[top:top + size, left:left + 2] = 255  # stem on the left
    image[top:top + 2, left:left + size] = 255  # top bar
    image[top + size // 2:top + size // 2 + 2, left:left + size * 2 // 3] = 255  # middle bar
    return image


def batch_of(image: torch.Tensor, n: int) -> torch.Tensor:
    return image.expand(n, 1, SIDE, SIDE).clone()


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_normalize_round_trips():
    raw = torch.randint(0, 256, (5, 1, SIDE, SIDE)).float()
    mean, std = 0.17, 0.33
    standardised = normalize(raw, mean, std)
    torch.testing.assert_close((standardised * std + mean) * 255.0, raw, rtol=0, atol=1e-3)
    assert normalize(torch.tensor(255.0 * mean), mean, std).item() == pytest.approx(0.0, abs=1e-6)


def test_zero_strengths_are_the_identity():
    images = batch_of(glyph_f(), 4)
    augment = BatchAugment(AugmentSettings(rotation_deg=0.0, translate_frac=0.0, erasing_prob=0.0, elastic_px=0.0))
    assert torch.equal(augment(images), images)
    # The warp itself with identity matrices reproduces the input (pixel centres map onto themselves).
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(4, 2, 3)
    torch.testing.assert_close(affine_warp(images, identity), images, rtol=0, atol=1e-3)


def test_centred_glyph_stays_inside_the_frame():
    images = batch_of(glyph_f(), 256)
    augment = BatchAugment(AugmentSettings(rotation_deg=15.0, translate_frac=0.1, erasing_prob=0.0, elastic_px=0.0),
                           torch.Generator().manual_seed(1))
    out = augment(images)
    border = torch.ones(SIDE, SIDE, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert out[:, 0][:, border].abs().max().item() == 0.0  # background stays black, nothing leaves the frame
    mass = out.sum(dim=(1, 2, 3)) / images.sum(dim=(1, 2, 3))
    assert mass.min().item() > 0.9 and mass.max().item() < 1.1  # no crop, no scale change
    assert out.min().item() >= 0.0 and out.max().item() <= 255.0
    assert not torch.equal(out[0], out[1])  # each sample gets its own matrix


def test_augmentation_never_mirrors():
    image = glyph_f()
    images = batch_of(image, 256)
    augment = BatchAugment(AugmentSettings(rotation_deg=20.0, translate_frac=0.0, erasing_prob=0.0, elastic_px=0.0),
                           torch.Generator().manual_seed(2))
    out = augment(images)
    original = correlation(out, images)
    for mirror in (image.flip(-1), image.flip(-2), image.flip(-1).flip(-2)):
        assert (original > correlation(out, batch_of(mirror, 256))).all()


def test_random_erasing_blacks_out_one_box_per_picked_image():
    images = torch.full((400, 1, SIDE, SIDE), 200.0)
    augment = BatchAugment(AugmentSettings(rotation_deg=0.0, translate_frac=0.0, erasing_prob=0.5, elastic_px=0.0),
                           torch.Generator().manual_seed(3))
    out = augment(images)
    erased = (out == 0).flatten(1)
    picked = erased.any(1)
    assert 0.4 < picked.float().mean().item() < 0.6
    assert set(out.unique().tolist()) <= {0.0, 200.0}
    for mask in erased[picked][:50].view(-1, SIDE, SIDE):  # each erased region is one filled rectangle
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert mask.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_same_generator_seed_same_augmentation():
    images = batch_of(glyph_f(), 16)
    settings = AugmentSettings(rotation_deg=12.0, translate_frac=0.1, erasing_prob=0.25, elastic_px=0.0)
    first = BatchAugment(settings, torch.Generator().manual_seed(7))(images)
    second = BatchAugment(settings, torch.Generator().manual_seed(7))(images)
    third = BatchAugment(settings, torch.Generator().manual_seed(8))(images)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_wrong_shape_is_rejected():
    augment = BatchAugment(load_settings().augment)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        augment(torch.zeros(4, SIDE, SIDE))


def test_works_on_uint8_derived_batches_like_the_loop():
    images = torch.from_numpy(np.zeros((3, SIDE, SIDE), np.uint8)).unsqueeze(1).float()
    assert BatchAugment(load_settings().augment)(images).shape == (3, 1, SIDE, SIDE)


def test_elastic_distortion_bends_strokes_a_little_and_per_image():
    images = batch_of(glyph_f(), 64)
    plain = AugmentSettings(rotation_deg=0.0, translate_frac=0.0, erasing_prob=0.0, elastic_px=0.0)
    augment = BatchAugment(plain.model_copy(update={"elastic_px": 2.0}), torch.Generator().manual_seed(4))
    field = augment.random_displacements(64, SIDE, SIDE)
    pixels = field * (SIDE / 2)  # normalised units back to pixels
    assert field.shape == (64, SIDE, SIDE, 2)
    assert 0.3 < pixels.abs().mean().item() < 2.0 and pixels.abs().max().item() <= 2.0 * 1.3
    # Smooth: neighbouring pixels move alike (a per-pixel random field would differ by up to 4 pixels).
    assert (pixels[:, 1:] - pixels[:, :-1]).abs().max().item() < 0.8
    out = augment(images)
    assert not torch.equal(out, images) and not torch.equal(out[0], out[1])
    assert out.min().item() >= 0.0 and out.max().item() <= 255.0
    # Still the same glyph, bent: closer to itself than to any mirror of it (2-pixel strokes, 2-pixel bends).
    for mirror in (glyph_f().flip(-1), glyph_f().flip(-2)):
        assert correlation(out, images).mean() > correlation(out, batch_of(mirror, 64)).mean() + 0.2
    # Ink is bent, stretched or squeezed locally, never cut off (the glyph stays in the frame).
    mass = out.sum(dim=(1, 2, 3)) / images.sum(dim=(1, 2, 3))
    assert mass.min().item() > 0.5 and mass.max().item() < 1.5
    assert out[:, 0, 0].abs().max().item() == 0.0 and out[:, 0, -1].abs().max().item() == 0.0


def test_elastic_off_keeps_the_random_stream():
    """Off (0) draws nothing extra, so runs without it reproduce their earlier augmentation exactly."""
    settings = AugmentSettings(rotation_deg=12.0, translate_frac=0.1, erasing_prob=0.25, elastic_px=0.0)
    generator = torch.Generator().manual_seed(9)
    BatchAugment(settings, generator)(batch_of(glyph_f(), 8))
    fresh = torch.Generator().manual_seed(9)
    augment = BatchAugment(settings, fresh)
    augment.random_matrices(8)
    augment.random_erase_masks(torch.Size((8, 1, SIDE, SIDE)))
    assert torch.equal(generator.get_state(), fresh.get_state())
