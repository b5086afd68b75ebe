"""The Frechet distance between two sets of features, as in FID (Heusel et al. 2017).

d^2 = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2}), the squared
2-Wasserstein distance between the Gaussians fitted to the two sets. It is a pure function of
the feature arrays (any extractor's); with the Inception network's pool features it is FID.
Distances over other features, such as the digits classifier of
:mod:`vdm_jax.training.features`, are not comparable with published FID figures.

Computed in float64 numpy with symmetric eigendecompositions only (no general matrix square
root), which keeps it exact for rank-deficient covariances as well.
"""

from __future__ import annotations

import numpy as np

from vdm_jax.errors import UserError

__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_from_statistics"]


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, N - 1) of a feature set.

    Args:
      features: ``[N, F]`` array-like of floats, N >= 2.

    Returns:
      ``(mean [F], covariance [F, F])``, float64.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise UserError(
            f"features must be a [N, F] array with N >= 2, got shape {features.shape}; "
            "pass one feature vector per row"
        )
    if not np.all(np.isfinite(features)):
        raise UserError("features contain NaN or Inf; check the extractor's inputs")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(
        features.shape[1], features.shape[1]
    )


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b) -> float:
    """The squared Frechet distance between N(mean_a, cov_a) and N(mean_b, cov_b).

    Args:
      mean_a, mean_b: ``[F]`` means; cov_a, cov_b: ``[F, F]`` covariances.

    Returns:
      d^2 >= 0 as a Python float, in squared feature units.
    """
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape:
        raise UserError(
            f"feature sets differ in width: means {mean_a.shape} and {mean_b.shape}, "
            f"covariances {cov_a.shape} and {cov_b.shape}; use the same extractor for both"
        )
    root_a = _psd_sqrt(cov_a)
    # tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}) = sum of the square roots of its eigenvalues.
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sum(np.sqrt(np.clip(inner, 0.0, None)))
    distance = np.sum(np.square(mean_a - mean_b)) + np.trace(cov_a) + np.trace(cov_b)
    return float(max(distance - 2.0 * trace_root, 0.0))


def frechet_distance(features_a, features_b) -> float:
    """The squared Frechet distance between two feature sets (FID's formula).

    Args:
      features_a, features_b: ``[N_a, F]`` and ``[N_b, F]`` float arrays, one row per image.

    Returns:
      d^2 >= 0 as a Python float, in squared feature units; 0 for a set against itself.
    """
    return frechet_distance_from_statistics(
        *feature_statistics(features_a), *feature_statistics(features_b)
    )
