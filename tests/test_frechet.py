"""The Frechet distance against its closed forms."""

import numpy as np
import pytest

from vdm_jax.errors import UserError
from vdm_jax.maths import frechet


def test_a_set_against_itself_is_zero_and_a_shift_adds_its_squared_length():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    assert frechet.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)
    for length in (0.1, 1.0, 3.0):
        shift = length * np.ones(6) / np.sqrt(6)
        distance = frechet.frechet_distance(features, features + shift)
        assert distance == pytest.approx(length**2, rel=1e-7, abs=1e-8)
    # Independent samples of one Gaussian: small, and growing with the shift.
    other = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    distances = [frechet.frechet_distance(features, other + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert distances == sorted(distances)


def test_statistics_form_matches_the_closed_form_for_diagonal_gaussians():
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])  # one rank-deficient
    mean_a, mean_b = np.zeros(3), np.array([1.0, -2.0, 0.5])
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    distance = frechet.frechet_distance_from_statistics(
        mean_a, np.diag(var_a), mean_b, np.diag(var_b)
    )
    assert distance == pytest.approx(expected, rel=1e-10)
    # Rotating both Gaussians together changes nothing.
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    rotated = frechet.frechet_distance_from_statistics(
        q @ mean_a, q @ np.diag(var_a) @ q.T, q @ mean_b, q @ np.diag(var_b) @ q.T
    )
    assert rotated == pytest.approx(expected, rel=1e-7)


def test_bad_feature_arrays_raise_user_errors():
    with pytest.raises(UserError, match="N >= 2"):
        frechet.frechet_distance(np.ones((1, 3)), np.ones((5, 3)))
    with pytest.raises(UserError, match="differ in width"):
        frechet.frechet_distance(np.ones((4, 3)), np.ones((5, 2)))
    with pytest.raises(UserError, match="NaN"):
        frechet.frechet_distance(np.full((4, 3), np.nan), np.ones((5, 3)))
