"""The score network's inputs: the sinusoidal embedding of the noise level and the base-2
Fourier features of the latent (Kingma et al. 2021, appendix B), as pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from vdm_jax.errors import UserError

__all__ = ["base2_fourier_features", "timestep_embedding"]


def timestep_embedding(t: jax.Array, dim: int, scale: float = 1000.0) -> jax.Array:
    """Sinusoidal embedding of a batch of scalars (the Transformer/fairseq recipe).

    The embedding of ``s = scale * t`` is ``[sin(s * w_0..w_{h-1}), cos(s * w_0..w_{h-1})]``
    with ``h = dim // 2`` and geometrically spaced ``w_i = 10000 ** (-i / (h - 1))``; an odd
    ``dim`` gets one trailing zero.

    Args:
      t: float array [B], typically a normalised time or log-SNR in [0, 1].
      dim: int >= 1, embedding width.
      scale: float multiplier applied to ``t`` first (1000, as in the reference).

    Returns:
      float32 array [B, dim].
    """
    t = jnp.asarray(t, jnp.float32)
    if t.ndim != 1:
        raise UserError(f"t must have shape [B], got shape {t.shape}")
    if dim < 1:
        raise UserError(f"dim must be >= 1, got {dim}")
    half = dim // 2
    log_step = math.log(10000.0) / max(half - 1, 1)
    freqs = jnp.exp(-log_step * jnp.arange(half, dtype=jnp.float32))  # [half]
    angles = (scale * t)[:, None] * freqs[None, :]  # [B, half]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [B, 2*half]
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def base2_fourier_features(z: jax.Array, exponents: Sequence[int]) -> jax.Array:
    """Base-2 Fourier features ``sin(2**n * 2*pi * z)`` and ``cos(...)`` of every channel.

    The channel layout matches the reference release: all sines, then all cosines; within
    each, channel-major and exponent-minor (``c0 n0, c0 n1, ..., c1 n0, ...``). Computed in
    float32 whatever the input dtype (``2**7 * 2*pi * z`` would lose its phase in bfloat16).

    Args:
      z: float array [..., C].
      exponents: the integer exponents n (the paper uses 6 and 7).

    Returns:
      float32 array [..., 2 * C * len(exponents)].
    """
    z = jnp.asarray(z, jnp.float32)
    freqs = 2.0 * jnp.pi * 2.0 ** jnp.asarray(exponents, jnp.float32)  # [F]
    phases = z[..., :, None] * freqs  # [..., C, F]
    phases = phases.reshape((*z.shape[:-1], z.shape[-1] * len(exponents)))
    return jnp.concatenate([jnp.sin(phases), jnp.cos(phases)], axis=-1)
