"""What sampling and likelihoods ask of a model, and the argument checks they share.

``model`` is any Linen module with the methods of :class:`vdm_jax.models.vdm.VDM` that
sampling needs:

* ``gamma(t)``: gamma = -log SNR at times ``t`` (any shape) in [0, 1], float32;
* ``endpoints()``: ``(gamma(0), gamma(1))``, float32 scalars;
* ``predict_noise(z, gamma_t, labels, train=False)``: eps_hat, ``z.shape`` float32, for z
  ``[B, H, W, C]`` and gamma_t ``[B]``;
* ``decode_log_probs(z_0)``: log p(x|z_0), ``z_0.shape + (V,)``;
* the field ``vocab_size`` (V);

and ``params`` is its variables dict (``{"params": ...}``). The functions here call those
methods; :mod:`vdm_jax.models.sampling` (discrete-time samplers) and
:mod:`vdm_jax.models.ode` (the probability-flow ODE) are built on them.
"""

from __future__ import annotations

import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.errors import UserError

Array = jax.Array

__all__ = [
    "DECODE_MODES",
    "begin",
    "check_choice",
    "check_positive",
    "check_shape",
    "decode_latent",
    "decode_log_probs",
    "endpoints",
    "eps_hat",
    "finish",
    "gamma",
    "sum_per_example",
]

#: How latents z_0 become integers: the decoder's most likely value, or a draw from it.
DECODE_MODES = ("argmax", "sample")


def check_shape(shape) -> tuple[int, int, int, int]:
    """``shape`` as a tuple of 4 positive ints ``(B, H, W, C)``; else a
    :class:`~vdm_jax.errors.UserError`."""
    try:
        dims = tuple(operator.index(n) for n in shape)
    except TypeError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise UserError(f"shape must be a tuple of 4 positive ints (B, H, W, C), got {shape!r}")
    return dims


def check_choice(name: str, value: str, choices) -> None:
    """A :class:`~vdm_jax.errors.UserError` naming ``name`` unless ``value`` is one of
    ``choices``."""
    if value not in choices:
        raise UserError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive(name: str, value) -> None:
    """A :class:`~vdm_jax.errors.UserError` naming ``name`` unless ``value > 0``."""
    if not value > 0:
        raise UserError(f"{name} must be positive, got {value!r}")


def _output(model: nn.Module, params, *args, **kwargs) -> Any:
    """``model.apply``'s output (these calls change no collection, so it is the output alone)."""
    return model.apply(params, *args, **kwargs)


def gamma(model: nn.Module, params, t: Array) -> Array:
    """The model's gamma = -log SNR at times ``t`` (any shape, float32 in [0, 1])."""
    return _output(model, params, t, method="gamma")


def endpoints(model: nn.Module, params) -> tuple[Array, Array]:
    """``(gamma(0), gamma(1))`` of the model, float32 scalars."""
    return _output(model, params, method="endpoints")


def eps_hat(model: nn.Module, params, z: Array, gamma_t: Array, labels: Array | None) -> Array:
    """eps_hat for z ``[B, ...]`` at a scalar gamma_t (broadcast to ``[B]``)."""
    gamma_b = jnp.broadcast_to(jnp.asarray(gamma_t, jnp.float32), (z.shape[0],))
    return _output(model, params, z, gamma_b, labels, train=False, method="predict_noise")


def decode_log_probs(model: nn.Module, params, z_0: Array) -> Array:
    """log p(x|z_0) over the V values, float32 ``[*z_0.shape, V]`` (nats)."""
    return _output(model, params, z_0, method="decode_log_probs")


def decode_latent(model: nn.Module, params, z_0: Array, key: Array, decode: str) -> Array:
    """Integers 0..V-1, ``z_0.shape`` int32: argmax or a sample of p(x|z_0)."""
    log_probs = decode_log_probs(model, params, z_0)
    if decode == "argmax":
        return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, log_probs, axis=-1).astype(jnp.int32)


def sum_per_example(values: Array) -> Array:
    """``values`` ``[B, ...]`` summed over every axis but the first: ``[B]``."""
    return jnp.sum(values, axis=tuple(range(1, values.ndim)))


def begin(key: Array, shape, num_steps: int | None, decode: str):
    """Checks a sampler's settings; returns the shape, z_1 ~ N(0, I) and the keys of the steps'
    noise and the decoder. z_1 depends on the key alone, so that every sampler given the same
    key starts from the same noise."""
    shape = check_shape(shape)
    if num_steps is not None:
        check_positive("num_steps", num_steps)
    check_choice("decode", decode, DECODE_MODES)
    key_init, key_rest = jax.random.split(key)
    key_steps, key_decode = jax.random.split(key_rest)
    return shape, jax.random.normal(key_init, shape, jnp.float32), key_steps, key_decode


def finish(model, params, z_0, key, decode, return_latent):
    """The decoded images (int32, ``z_0.shape``) of the final latent ``z_0``, and ``z_0`` too
    when ``return_latent``."""
    images = decode_latent(model, params, z_0, key, decode)
    return (images, z_0) if return_latent else images
