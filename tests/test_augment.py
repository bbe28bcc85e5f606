import pytest
import torch

from condense_pipeline.condense.augment import OPS, apply, augment_batch, sample, sample_siamese


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid(h: int = 3, w: int = 3) -> torch.Tensor:
    """[1, 1, h, w] holding 0, 1, 2, ... row by row."""
    return torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)


def color(b: float = 0.0, s: float = 1.0, c: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        "brightness": torch.tensor([b]),
        "saturation": torch.tensor([s]),
        "contrast": torch.tensor([c]),
    }


# --- each op against hand-computed values ---


def test_brightness_adds_offset():
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(apply(x, "color", color(b=0.3)), x + 0.3)


def test_saturation_zero_makes_every_channel_the_channel_mean():
    x = torch.randn(1, 3, 4, 4)
    out = apply(x, "color", color(s=0.0))
    torch.testing.assert_close(out, x.mean(dim=1, keepdim=True).expand_as(x))


def test_contrast_scales_around_the_image_mean():
    x = grid()
    out = apply(x, "color", color(c=2.0))
    torch.testing.assert_close(out, 2 * x - 4.0)  # image mean of 0..8 is 4


def test_crop_shifts_and_zero_fills():
    x = grid()
    down = apply(x, "crop", {"dy": torch.tensor([1]), "dx": torch.tensor([0])})
    torch.testing.assert_close(down[0, 0], torch.tensor([[3.0, 4, 5], [6, 7, 8], [0, 0, 0]]))
    right = apply(x, "crop", {"dy": torch.tensor([0]), "dx": torch.tensor([-1])})
    torch.testing.assert_close(right[0, 0], torch.tensor([[0.0, 0, 1], [0, 3, 4], [0, 6, 7]]))
    # A shift wider than the one-pixel pad must still fill with zeros, not repeat the border.
    far = apply(x, "crop", {"dy": torch.tensor([2]), "dx": torch.tensor([0])})
    torch.testing.assert_close(far[0, 0], torch.tensor([[6.0, 7, 8], [0, 0, 0], [0, 0, 0]]))


def test_cutout_zeros_the_expected_square():
    x = torch.ones(1, 1, 4, 4)
    out = apply(x, "cutout", {"cy": torch.tensor([1]), "cx": torch.tensor([2])})
    expected = torch.ones(4, 4)
    expected[0:2, 1:3] = 0  # side 2, top-left at (1 - 1, 2 - 1)
    torch.testing.assert_close(out[0, 0], expected)


def test_cutout_at_the_edge_is_clipped():
    x = torch.ones(1, 1, 4, 4)
    out = apply(x, "cutout", {"cy": torch.tensor([4]), "cx": torch.tensor([0])})
    expected = torch.ones(4, 4)
    expected[3, 0] = 0  # rows 3..4 and columns -1..0, clipped to the image
    torch.testing.assert_close(out[0, 0], expected)


def test_flip_reverses_columns_per_sample():
    x = torch.randn(2, 3, 4, 5)
    out = apply(x, "flip", {"flip": torch.tensor([True, False])})
    torch.testing.assert_close(out[0], x[0].flip(-1))
    torch.testing.assert_close(out[1], x[1])


def test_identity_scale_and_rotation_return_the_input():
    x = torch.randn(3, 3, 8, 8)
    one = torch.ones(1)
    torch.testing.assert_close(apply(x, "scale", {"sx": one, "sy": one}), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(apply(x, "rotate", {"angle": torch.zeros(1)}), x, atol=1e-5, rtol=0)


def test_scale_half_samples_the_middle():
    x = torch.arange(5.0).expand(1, 1, 5, 5)  # value = column index
    out = apply(x, "scale", {"sx": torch.tensor([0.5]), "sy": torch.tensor([1.0])})
    # Output column j samples normalised x/2, i.e. input column 1 + j/2 (bilinear).
    torch.testing.assert_close(out[0, 0, 2], torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))


def test_rotate_90_degrees_is_rot90():
    x = torch.randn(2, 3, 5, 5)
    out = apply(x, "rotate", {"angle": torch.tensor([90.0])})
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)


# --- sampling ---


def test_sample_shapes_and_ranges():
    n = 4000
    col = sample("color", n, gen(), size=32)
    assert col["brightness"].abs().max() <= 0.5
    assert 0 <= col["saturation"].min() and col["saturation"].max() < 2
    assert 0.5 <= col["contrast"].min() and col["contrast"].max() < 1.5
    crop = sample("crop", n, gen(), size=32)
    for key in ("dy", "dx"):  # round(0.125 * 32) = 4, both ends reachable
        assert set(crop[key].tolist()) == set(range(-4, 5))
    cut = sample("cutout", n, gen(), size=32)
    assert set(cut["cy"].tolist()) == set(range(0, 33))  # even side 16: centre 0..32
    scale = sample("scale", n, gen(), size=32)
    for key in ("sx", "sy"):
        assert 1 / 1.2 <= scale[key].min() and scale[key].max() < 1.2
    angle = sample("rotate", n, gen(), size=32)["angle"]
    assert angle.abs().max() <= 15 and angle.abs().max() > 14
    flip = sample("flip", n, gen(), size=32)["flip"]
    assert flip.dtype == torch.bool and 0.45 < flip.float().mean() < 0.55
    for op in OPS:
        assert all(p.shape == (7,) for p in sample(op, 7, gen(), size=32).values())


def test_same_seed_same_params_different_seed_different():
    for op in OPS:
        a, b = sample(op, 16, gen(1), size=32), sample(op, 16, gen(1), size=32)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        c = sample(op, 16, gen(2), size=32)
        assert any(not torch.equal(a[k], c[k]) for k in a)
    draws = [sample_siamese(OPS, gen(5), size=32) for _ in range(2)]
    assert draws[0][0] == draws[1][0]
    assert all(torch.equal(draws[0][1][k], draws[1][1][k]) for k in draws[0][1])
    ops = {sample_siamese(OPS, gen(seed), size=32)[0] for seed in range(60)}
    assert ops == set(OPS)


def test_unknown_op_and_bad_leading_dim_raise():
    with pytest.raises(ValueError, match="Unknown DSA op"):
        sample("blur", 1, gen(), size=8)
    with pytest.raises(ValueError, match="Unknown DSA op"):
        sample_siamese(["color", "blur"], gen(), size=8)
    with pytest.raises(ValueError, match="leading dim"):
        apply(torch.zeros(3, 1, 8, 8), "flip", {"flip": torch.tensor([True, False])})


# --- batching, Siamese, gradients ---


@pytest.mark.parametrize("op", OPS)
def test_leading_dim_one_broadcasts(op):
    x = torch.randn(3, 3, 8, 8)
    params = sample(op, 1, gen(3), size=8)
    repeated = {k: v.expand(3) for k, v in params.items()}
    one_by_one = torch.cat([apply(x[i : i + 1], op, params) for i in range(3)])
    torch.testing.assert_close(apply(x, op, params), one_by_one)
    torch.testing.assert_close(apply(x, op, repeated), one_by_one)


@pytest.mark.parametrize("seed", range(12))
def test_siamese_same_transform_for_real_and_synthetic(seed):
    # Catches: Siamese parameters that are not one draw broadcast over the batch (or an op that
    # draws randomness inside apply), which transform a real image and its synthetic copy
    # differently; a batch split in two would not notice, since each op is per sample.
    real, syn = torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 8)
    syn[1] = real[2]
    op, params = sample_siamese(OPS, gen(seed), size=8)
    assert op in OPS and all(p.shape == (1,) for p in params.values())
    out = apply(torch.cat([real, syn]), op, params)
    torch.testing.assert_close(out[5], out[2])
    assert not torch.equal(out[2], real[2]) or op == "flip"  # it did transform (flip: maybe not)


@pytest.mark.parametrize("op", OPS)
def test_gradients_reach_the_images(op):
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    apply(x, op, sample(op, 4, gen(), size=8)).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_float64_and_string_strategy():
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    op, params = sample_siamese("scale_rotate", gen(), size=8)
    assert op in ("scale", "rotate")
    assert apply(x, op, params).dtype == torch.float64


def test_augment_batch_changes_batch_keeps_shape():
    x = torch.randn(8, 3, 16, 16)
    for seed in range(6):
        out = augment_batch(x, ("color", "crop", "cutout", "scale", "rotate"), gen(seed))
        assert out.shape == x.shape and not torch.allclose(out, x)
    # Per-sample parameters: identical images come out different.
    same = torch.randn(1, 3, 16, 16).expand(8, -1, -1, -1)
    out = augment_batch(same, ["color"], gen())
    assert not torch.allclose(out[0], out[1])
    a, b = augment_batch(x, OPS, gen(9)), augment_batch(x, OPS, gen(9))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
