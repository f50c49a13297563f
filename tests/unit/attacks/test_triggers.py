"""Triggers are pure, seeded, shape-preserving, and reproducible from their saved spec."""

import numpy as np
import pytest

from ubt_core.attacks.triggers import ATTACKS, BlendedTrigger, _warp_field, make_trigger, trigger_from_dict


@pytest.fixture
def image():
    return np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("attack", ATTACKS)
def test_trigger_keeps_shape_and_dtype_and_changes_pixels(attack, image):
    out = make_trigger(attack).apply(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out != image).any()


@pytest.mark.parametrize("attack", ATTACKS)
def test_trigger_is_pure_and_reproducible_from_its_spec(attack, image):
    spec = make_trigger(attack, seed=5)
    before = image.copy()
    first = spec.apply(image)
    np.testing.assert_array_equal(image, before)  # input untouched
    again = trigger_from_dict(spec.model_dump()).apply(image)
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("attack", ["badnet", "wanet"])
def test_pattern_depends_on_seed(attack, image):
    assert (make_trigger(attack, 0).apply(image) != make_trigger(attack, 1).apply(image)).any()


def test_blended_noise_key_depends_on_seed_and_logo_key_does_not(image):
    noise = [BlendedTrigger(key="noise", seed=s).apply(image) for s in (0, 1)]
    logo = [BlendedTrigger(key="logo", seed=s).apply(image) for s in (0, 1)]
    assert (noise[0] != noise[1]).any()
    np.testing.assert_array_equal(logo[0], logo[1])


def test_badnet_touches_only_its_corner(image):
    out = make_trigger("badnet").apply(image)
    changed = np.argwhere((out != image).any(axis=-1))
    assert changed[:, 0].min() >= 28 and changed[:, 1].min() >= 28  # 4 px patch, bottom-right


def test_label_consistent_marks_all_four_corners(image):
    out = make_trigger("label-consistent").apply(image)
    corner = make_trigger("badnet").apply(image)[28:, 28:]
    for ys, xs in [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(28, 32)), (slice(28, 32), slice(0, 4))]:
        np.testing.assert_array_equal(out[ys, xs], corner)


def test_sig_is_an_additive_horizontal_wave():
    flat = np.full((32, 32, 3), 128, np.uint8)
    out = make_trigger("sig").apply(flat).astype(int)
    assert (out == out[:1]).all()  # same in every row
    assert out.max() - out.min() >= 50  # amplitude 30 either side


def test_wanet_moves_pixels_by_its_warp_field_without_changing_their_values():
    flat = np.full((32, 32, 3), 77, np.uint8)
    np.testing.assert_array_equal(make_trigger("wanet").apply(flat), flat)  # a warp of a flat image is itself
    slope = 8  # levels per pixel, left to right
    ramp = np.repeat((np.arange(32) * slope).astype(np.uint8)[None, :, None], 32, 0).repeat(3, 2)
    spec = make_trigger("wanet")
    sampled_x = (_warp_field(spec.seed, spec.grid, spec.strength, 32, 32)[0, ..., 0].numpy() + 1) * 31 / 2
    warped = spec.apply(ramp)[..., 0]
    np.testing.assert_allclose(warped, slope * sampled_x, atol=0.5 + 1e-3)  # bilinear sampling of a ramp is exact
    assert np.abs(warped.astype(int) - ramp[..., 0]).mean() > slope  # more than a pixel on average


def test_unknown_attack_is_refused():
    with pytest.raises(ValueError, match="attack"):
        make_trigger("nope")


def test_overrides_change_only_the_settings_they_name_and_a_misspelt_one_is_refused():
    assert make_trigger("blended", 2, {"alpha": 0.2}) == BlendedTrigger(alpha=0.2, seed=2)
    with pytest.raises(ValueError, match="alpah"):
        make_trigger("blended", 0, {"alpah": 0.3})
    with pytest.raises(ValueError, match="another attack"):
        make_trigger("blended", 0, {"attack": "sig"})
