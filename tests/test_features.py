"""The digits feature extractor behind the digits Frechet distance."""

import os

import numpy as np
import pytest

from vdm_jax.training import features, sources


@pytest.mark.slow
def test_digits_features_are_deterministic_cached_and_separate_digits_from_noise(tmp_path):
    extractor = features.digits_features(str(tmp_path))
    assert os.path.exists(extractor.cache_path)
    assert extractor.test_accuracy > 0.95
    test = sources.digits_source("test")
    test_images = np.stack([test[i]["image"] for i in range(len(test))])
    assert extractor(test_images).shape == (len(test_images), features.FEATURES)

    # Read back from the cache, and retrained to the same bits when the cache is corrupt.
    cached = features.digits_features(str(tmp_path))
    with open(extractor.cache_path, "wb") as f:
        f.write(b"not a weights file")
    rebuilt = features.digits_features(str(tmp_path))
    for name, value in extractor.params.items():
        np.testing.assert_array_equal(cached.params[name], value)
        np.testing.assert_array_equal(rebuilt.params[name], value)

    # Held-out digits are close to the training split; noise and shifted digits are far.
    held_out = extractor.distance(test_images)
    noise = extractor.distance(np.random.default_rng(0).integers(0, 17, (500, 8, 8, 1)))
    brighter = extractor.distance(np.clip(test_images.astype(int) + 4, 0, 16))
    assert held_out < 0.1 * min(noise, brighter), (held_out, noise, brighter)
    with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\]"):
        extractor(np.zeros((3, 8, 8)))
