"""Feature extractors for an offline sample-quality measure (a Frechet distance).

Published FID uses an Inception network trained on ImageNet, which needs a download and does
not fit 8x8 images. For the bundled digits this module trains a small classifier on the
digits' training split instead (deterministic: fixed seed, full-batch optimisation, float32
on the CPU), caches its weights in a folder, and uses its penultimate layer as the features
of :func:`vdm_jax.maths.frechet.frechet_distance`. The resulting "digits Frechet distance" ranks
models of the digits against each other; it is NOT comparable with published FID figures.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdm_jax.errors import UserError
from vdm_jax.maths import frechet
from vdm_jax.training import sources

__all__ = [
    "CACHE_ENV",
    "EXTRACTORS",
    "LABEL",
    "DigitsFeatures",
    "default_cache_dir",
    "digits_features",
]

Array = jax.Array

# The classifier: 64 inputs (pixels / 16) -> 64 -> FEATURES (ReLU) -> 10 classes.
_HIDDEN, FEATURES, _CLASSES = 64, 32, 10
_STEPS, _LEARNING_RATE, _WEIGHT_DECAY, _SEED = 300, 1e-2, 1e-3, 0
_VERSION = f"digits-mlp-v1-{_HIDDEN}-{FEATURES}-{_STEPS}-{_LEARNING_RATE}-{_WEIGHT_DECAY}-{_SEED}"
CACHE_ENV = "VDM_JAX_CACHE"
LABEL = "digits Frechet distance (a small digits classifier's features; not comparable with FID)"


def default_cache_dir() -> str:
    """``$VDM_JAX_CACHE`` if set, else ``~/.cache/vdm_jax``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vdm_jax")


def _init(key: Array) -> dict[str, Array]:
    sizes = [(64, _HIDDEN), (_HIDDEN, FEATURES), (FEATURES, _CLASSES)]
    params = {}
    for i, (key_i, (n_in, n_out)) in enumerate(zip(jax.random.split(key, 3), sizes, strict=True)):
        params[f"w{i}"] = jax.random.normal(key_i, (n_in, n_out)) * np.sqrt(2.0 / n_in)
        params[f"b{i}"] = jnp.zeros((n_out,))
    return params


def _features(params, images: Array) -> Array:
    x = jnp.reshape(jnp.asarray(images, jnp.float32), (images.shape[0], -1)) / 16.0
    h = jax.nn.relu(x @ params["w0"] + params["b0"])
    return jax.nn.relu(h @ params["w1"] + params["b1"])


def _logits(params, images: Array) -> Array:
    return _features(params, images) @ params["w2"] + params["b2"]


@jax.jit
def _train(images: Array, labels: Array) -> dict[str, Array]:
    optimizer = optax.adamw(_LEARNING_RATE, weight_decay=_WEIGHT_DECAY)
    params = _init(jax.random.key(_SEED))

    def loss(p):
        log_probs = jax.nn.log_softmax(_logits(p, images))
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))

    def step(carry, _):
        p, opt_state = carry
        grads = jax.grad(loss)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=_STEPS)
    return params


def _split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    source = sources.digits_source(split)
    images = np.stack([source[i]["image"] for i in range(len(source))])
    labels = np.asarray([source[i]["label"] for i in range(len(source))], np.int32)
    return images, labels


class DigitsFeatures:
    """The digits classifier's penultimate-layer features, and the distance built on them.

    Attributes:
      params: the classifier's weights (numpy float32 arrays).
      test_accuracy: its accuracy on the digits' test split, a float in [0, 1].
      cache_path: the file the weights were read from or written to.
    """

    def __init__(self, params: dict[str, np.ndarray], cache_path: str):
        self.params = params
        self.cache_path = cache_path
        self._apply = jax.jit(_features)
        images, labels = _split_arrays("test")
        predictions = np.argmax(np.asarray(jax.jit(_logits)(params, images)), axis=1)
        self.test_accuracy = float(np.mean(predictions == labels))
        self._reference: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, images) -> np.ndarray:
        """Features of integer digits ``[N, 8, 8, 1]`` (values 0..16): float32 ``[N, FEATURES]``."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (8, 8, 1):
            raise UserError(f"digits images must be [N, 8, 8, 1], got shape {images.shape}")
        return np.asarray(self._apply(self.params, images))

    def reference_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of the features of the digits' training split (1500 images)."""
        if self._reference is None:
            images, _ = _split_arrays("train")
            self._reference = frechet.feature_statistics(self(images))
        return self._reference

    def distance(self, images) -> float:
        """The squared Frechet distance of ``images`` to the training split, in these features.

        Args:
          images: integer digits ``[N, 8, 8, 1]``, N >= 2 (1000 or more for a stable figure).
        """
        return frechet.frechet_distance_from_statistics(
            *frechet.feature_statistics(self(images)), *self.reference_statistics()
        )


def _load(path: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as stored:
            params = {k: np.asarray(stored[k], np.float32) for k in stored.files}
    except (OSError, ValueError, KeyError, EOFError):
        return None
    expected = jax.tree.map(np.shape, _init(jax.random.key(0)))
    if jax.tree.map(np.shape, params) != expected:
        return None
    return params


def digits_features(cache_dir: str | None = None) -> DigitsFeatures:
    """The digits feature extractor: trained once (a few seconds), then read from the cache.

    Args:
      cache_dir: a folder for the weights (created if needed); default
        :func:`default_cache_dir`. A missing, unreadable or mismatched cache file is rebuilt.

    Returns:
      A :class:`DigitsFeatures`.
    """
    cache_dir = cache_dir or default_cache_dir()
    digest = hashlib.sha256(_VERSION.encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"digits_classifier_{digest}.npz")
    params = _load(path) if os.path.exists(path) else None
    if params is None:
        images, labels = _split_arrays("train")
        params = jax.tree.map(np.asarray, _train(jnp.asarray(images), jnp.asarray(labels)))
        os.makedirs(cache_dir, exist_ok=True)
        temporary = f"{path}.tmp{os.getpid()}"
        with open(temporary, "wb") as f:
            np.savez(f, **params)
        os.replace(temporary, path)  # atomic: a concurrent reader never sees half a file
    return DigitsFeatures(params, path)


#: Extractors by data set name: ``name -> (cache_dir -> extractor)``.
EXTRACTORS: dict[str, Callable[[str | None], DigitsFeatures]] = {"digits": digits_features}
