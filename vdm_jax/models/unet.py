"""The VDM score network: a full-resolution ResNet/U-Net that predicts the noise.

This is the noise-prediction network of Variational Diffusion Models (Kingma, Salimans,
Poole, Ho 2021, arXiv 2107.00630), as a Flax Linen module. It works at the resolution of its
input throughout (no down- or up-sampling)::

    z [B, H, W, C] --(concat base-2 Fourier features)--> 3x3 conv to n_embd channels
      -> n_layer ResNet blocks                      (each output kept as a skip)
      -> ResNet block, self-attention, ResNet block (the middle)
      -> n_layer + 1 ResNet blocks, each fed [h, skip] concatenated on channels
      -> GroupNorm, swish, 3x3 conv to C channels (zero-initialised)  = f(z)
    eps_hat = z + f(z)

Every ResNet block receives the conditioning vector: a sinusoidal embedding of the normalised
log-SNR ``(gamma - gamma_min) / (gamma_max - gamma_min) * 1000`` (plus, optionally, a learned
class embedding) sent through a two-layer swish MLP of width ``4 * n_embd``.

With 32x32x3 inputs, ``n_layer=32``, ``n_embd=128``, Fourier features on and no per-block
attention, :class:`ScoreUNet` has 30,577,667 parameters: the authors' release has 512 more
because its conditioning MLP takes one extra scalar input (``conditioning_input=True``).

Mixed precision: ``dtype`` is the computation dtype of convolutions, dense layers, norms and
the residual stream; parameters are always float32. The sinusoidal embedding, the Fourier
features, the attention softmax and the returned ``eps_hat`` are float32 whatever ``dtype``.

Public names: :class:`ScoreUNet`, :class:`ResNetBlock`, :class:`AttentionBlock`,
:func:`largest_group_count`; the attention itself is :mod:`vdm_jax.models.attention`, the
sinusoidal and Fourier inputs :mod:`vdm_jax.models.embeddings`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.errors import UserError
from vdm_jax.models.attention import ATTENTION_KINDS, dot_product_attention
from vdm_jax.models.embeddings import base2_fourier_features, timestep_embedding

__all__ = ["AttentionBlock", "ResNetBlock", "ScoreUNet", "group_norm", "largest_group_count"]

Dtype = Any

# Parameters are stored in float32 whatever the computation dtype.
_PARAM_DTYPE = jnp.float32
# Flax's default kernel initialiser for Conv and Dense.
_DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()


def largest_group_count(channels: int, max_groups: int, min_group_size: int = 4) -> int:
    """Number of GroupNorm groups for ``channels`` channels.

    The largest divisor of ``channels`` that is at most ``max_groups`` and leaves at least
    ``min_group_size`` channels in every group (when ``channels`` allows it). The paper's
    network (128 and 256 channels, 32 groups) gets 32 groups everywhere. Small test models get
    fewer, bigger groups rather than one channel per group: with a single channel per group,
    GroupNorm is instance norm and erases the per-channel shift by which every ResNet block
    receives its conditioning, so the network would ignore gamma_t and the labels.

    Args:
      channels: int >= 1, the channel count being normalised.
      max_groups: int >= 1, the preferred (maximum) number of groups, e.g. 32.
      min_group_size: int >= 1, the fewest channels per group wanted (4, as in the paper).

    Returns:
      int g with ``1 <= g <= max_groups`` and ``channels % g == 0``; e.g. 32 for (128, 32),
      4 for (16, 32), 8 for (32, 32), 2 for (8, 32), 1 for (3, 32).
    """
    if channels < 1 or max_groups < 1 or min_group_size < 1:
        raise UserError(
            f"channels, max_groups and min_group_size must be >= 1, got channels={channels}, "
            f"max_groups={max_groups}, min_group_size={min_group_size}"
        )
    limit = max(1, min(max_groups, channels // min_group_size))
    for groups in range(limit, 0, -1):
        if channels % groups == 0:
            return groups
    return 1  # unreachable: 1 divides everything


def group_norm(
    channels: int, max_groups: int, dtype: Dtype, name: str | None = None, min_group_size: int = 4
):
    """``flax.linen.GroupNorm`` with a group count that suits ``channels`` (see
    largest_group_count), epsilon 1e-6, float32 statistics and parameters."""
    return nn.GroupNorm(
        num_groups=largest_group_count(channels, max_groups, min_group_size),
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=_PARAM_DTYPE,
        name=name,
    )


def dropout(x: jax.Array, rate: float, keys: jax.Array) -> jax.Array:
    """Dropout with one PRNG key per example: ``x / (1 - rate)`` where kept, else 0.

    As ``flax.linen.Dropout``, but example i's mask depends only on ``keys[i]``, so a batch
    gives the same result whether it is processed whole or in pieces.

    Args:
      x: array [B, ...].
      rate: the probability of dropping an element, in [0, 1).
      keys: [B] PRNG keys.
    """
    keep = 1.0 - rate
    mask = jax.vmap(lambda key: jax.random.bernoulli(key, keep, x.shape[1:]))(keys)
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


class ResNetBlock(nn.Module):
    """Pre-activation residual block with two 3x3 convolutions and additive conditioning.

    ``GroupNorm -> swish -> conv -> (+ Dense(cond)) -> GroupNorm -> swish -> dropout -> conv``,
    added to the input (through a 1x1 Dense projection when the channel count changes). The
    second convolution and the conditioning projection are zero-initialised, so a fresh block
    is the identity (or the 1x1 projection).

    Attributes:
      out_channels: output channels; None keeps the input channel count.
      dropout_rate: dropout probability before the second convolution.
      norm_groups: preferred GroupNorm group count (see largest_group_count).
      norm_min_group_size: fewest channels per group (see largest_group_count).
      dtype: computation dtype (parameters are float32).
    """

    out_channels: int | None = None
    dropout_rate: float = 0.0
    norm_groups: int = 32
    norm_min_group_size: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cond: jax.Array,
        train: bool = False,
        dropout_keys: jax.Array | None = None,
    ) -> jax.Array:
        """Apply the block.

        Args:
          x: float array [B, H, W, C_in].
          cond: float array [B, D], the conditioning vector.
          train: if True, apply dropout.
          dropout_keys: None, or [B] PRNG keys, one per example, for the dropout masks; None
            draws them from the 'dropout' rng (when dropout applies).

        Returns:
          array [B, H, W, out_channels] in ``dtype``.
        """
        in_channels = x.shape[-1]
        out_channels = in_channels if self.out_channels is None else self.out_channels
        if cond.ndim != 2 or cond.shape[0] != x.shape[0]:
            raise UserError(
                f"cond must have shape [B, D] with B={x.shape[0]}, got shape {cond.shape}"
            )

        def conv(name, kernel_init=_DEFAULT_KERNEL_INIT):
            return nn.Conv(
                out_channels,
                kernel_size=(3, 3),
                kernel_init=kernel_init,
                dtype=self.dtype,
                param_dtype=_PARAM_DTYPE,
                name=name,
            )

        norm = group_norm(
            in_channels, self.norm_groups, self.dtype, "norm1", self.norm_min_group_size
        )
        h = nn.swish(norm(x))
        h = conv("conv1")(h)
        cond_shift = nn.Dense(
            out_channels,
            use_bias=False,
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=_PARAM_DTYPE,
            name="cond_proj",
        )(cond)  # [B, out_channels]
        h = h + cond_shift[:, None, None, :]
        norm = group_norm(
            out_channels, self.norm_groups, self.dtype, "norm2", self.norm_min_group_size
        )
        h = nn.swish(norm(h))
        if train and self.dropout_rate > 0.0:
            if dropout_keys is None:
                dropout_keys = jax.random.split(self.make_rng("dropout"), x.shape[0])
            h = dropout(h, self.dropout_rate, dropout_keys)
        h = conv("conv2", kernel_init=nn.initializers.zeros)(h)

        if in_channels != out_channels:
            x = nn.Dense(
                out_channels, dtype=self.dtype, param_dtype=_PARAM_DTYPE, name="skip_proj"
            )(x)
        return x.astype(h.dtype) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions, as a residual block.

    ``x + proj_out(softmax(q k^T / sqrt(C)) v)`` with q, k, v 1x1 projections of
    ``GroupNorm(x)``; ``proj_out`` is zero-initialised so a fresh block is the identity. The
    logits and softmax are computed in float32.

    Attributes:
      norm_groups: preferred GroupNorm group count (see largest_group_count).
      norm_min_group_size: fewest channels per group (see largest_group_count).
      dtype: computation dtype (parameters are float32).
      attention: the formulation, one of :data:`~vdm_jax.models.attention.ATTENTION_KINDS` (see
        :func:`~vdm_jax.models.attention.dot_product_attention`).
    """

    norm_groups: int = 32
    norm_min_group_size: int = 4
    dtype: Dtype = jnp.float32
    attention: str = "dot_product"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block.

        Args:
          x: float array [B, H, W, C].
          train: whether this is a training pass: with ``attention="chunked"`` its gradient
            then comes from the recomputing custom VJP of
            :func:`~vdm_jax.models.attention.dot_product_attention` (reverse mode only).

        Returns:
          array [B, H, W, C] in ``dtype``.
        """
        batch, height, width, channels = x.shape

        def dense(name, kernel_init=_DEFAULT_KERNEL_INIT):
            return nn.Dense(
                channels,
                kernel_init=kernel_init,
                dtype=self.dtype,
                param_dtype=_PARAM_DTYPE,
                name=name,
            )

        h = group_norm(channels, self.norm_groups, self.dtype, "norm", self.norm_min_group_size)(x)
        seq_shape = (batch, height * width, channels)
        query = dense("query")(h).reshape(seq_shape)
        key = dense("key")(h).reshape(seq_shape)
        value = dense("value")(h).reshape(seq_shape)
        attended = dot_product_attention(
            query, key, value, kind=self.attention, custom_gradient=train
        )
        attended = attended.reshape((batch, height, width, channels))
        h = dense("proj_out", kernel_init=nn.initializers.zeros)(attended)
        return x.astype(h.dtype) + h


class ScoreUNet(nn.Module):
    """The VDM noise-prediction network ``eps_hat(z_t; gamma_t[, label])``.

    See the module docstring for the architecture. All blocks keep ``n_embd`` channels and the
    input resolution, so any H, W and C work (8x8x1 digits, 32x32x3, 64x64x3, ...).

    Conditioning: ``gamma_t`` is normalised to ``(gamma_t - gamma_min) / (gamma_max - gamma_min)``,
    embedded with :func:`~vdm_jax.models.embeddings.timestep_embedding` (scale 1000) into ``n_embd``
    features, and, when ``num_classes > 0``, the learned class embedding (an ``nn.Embed`` with
    ``num_classes + 1`` rows of ``n_embd`` features) is ADDED to it; the sum goes through two swish
    Dense layers of width ``4 * n_embd``. Label ``num_classes`` means "unconditional", so one model
    can be trained with label dropout and sampled with classifier-free guidance. Adding (rather than
    concatenating) keeps the MLP's shapes independent of ``num_classes``. With
    ``conditioning_input=True`` a float scalar per example (``conditioning``, e.g. a flag saying
    that the image was augmented) is concatenated to that embedding as one more feature, as in the
    authors' released network, whose first MLP layer has ``n_embd + 1`` inputs.

    Attributes:
      n_layer: ResNet blocks before the middle (``n_layer + 1`` after it); paper: 32.
      n_embd: channels of every block; the conditioning MLP has ``4 * n_embd``; paper: 128.
      gamma_min: gamma (= -log SNR) mapped to 0 before the sinusoidal embedding.
      gamma_max: gamma mapped to 1 (then scaled by 1000); must exceed ``gamma_min``.
      dropout_rate: dropout probability inside every ResNet block; paper: 0.1.
      attention_everywhere: add a self-attention block after every ResNet block outside the
        middle (the middle always has one).
      with_fourier_features: concatenate
        :func:`~vdm_jax.models.embeddings.base2_fourier_features` of z to the input.
      fourier_exponents: the base-2 exponents of those features; paper: (6, 7).
      num_classes: number of classes for class conditioning; 0 disables it.
      norm_groups: preferred GroupNorm group count; every norm uses the largest divisor of its
        channel count not above it that leaves >= 4 channels per group (so n_embd=8 or 16
        work and keep their conditioning; see :func:`largest_group_count`).
      norm_min_group_size: fewest channels per GroupNorm group (4). 1 gives exactly
        ``norm_groups`` groups whenever it divides the width, as the authors' network has (one
        channel per group at 32 channels).
      conditioning_input: take the scalar ``conditioning`` input described above.
      dtype: computation dtype (e.g. jnp.bfloat16 for mixed precision); parameters are float32
        and the returned eps_hat is float32.
      attention: the self-attention formulation, one of
        :data:`~vdm_jax.models.attention.ATTENTION_KINDS`: ``"dot_product"`` (default;
        :func:`jax.nn.dot_product_attention`, cuDNN flash attention on GPUs) or ``"chunked"``
        (faster on CPUs); see :func:`~vdm_jax.models.attention.dot_product_attention`.
      batch_pieces: run the network on the batch in this many equal pieces (the largest
        divisor of the batch not above it); default 1. Results do not depend on it: every
        layer works per example and dropout draws one key per example. On a CPU, XLA runs the
        pieces' operations concurrently, which uses both cores of a 2-core machine although
        its convolution kernels are single-threaded (2 is faster there); accelerators want 1.
      remat: rematerialise every ResNet and attention block (``jax.checkpoint`` per block,
        ``flax.linen.remat``): the backward pass recomputes each block's activations from its
        input instead of storing them, for large batches that would not fit otherwise, at the
        cost of a second forward pass through the blocks. Same parameters and results.
    """

    n_layer: int = 32
    n_embd: int = 128
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    dropout_rate: float = 0.1
    attention_everywhere: bool = False
    with_fourier_features: bool = True
    fourier_exponents: tuple[int, ...] = (6, 7)
    num_classes: int = 0
    norm_groups: int = 32
    norm_min_group_size: int = 4
    conditioning_input: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "dot_product"
    batch_pieces: int = 1
    remat: bool = False

    def __post_init__(self):
        """Validate the hyper-parameters (UserError naming the offending value)."""
        if self.batch_pieces < 1:
            raise UserError(f"batch_pieces must be >= 1, got {self.batch_pieces}")
        if self.attention not in ATTENTION_KINDS:
            raise UserError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.n_layer < 0:
            raise UserError(f"n_layer must be >= 0, got {self.n_layer}")
        if self.n_embd < 1:
            raise UserError(f"n_embd must be >= 1, got {self.n_embd}")
        if not self.gamma_max > self.gamma_min:
            raise UserError(
                f"gamma_max must exceed gamma_min, got gamma_min={self.gamma_min}, "
                f"gamma_max={self.gamma_max}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise UserError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.num_classes < 0:
            raise UserError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.norm_groups < 1:
            raise UserError(f"norm_groups must be >= 1, got {self.norm_groups}")
        if self.norm_min_group_size < 1:
            raise UserError(f"norm_min_group_size must be >= 1, got {self.norm_min_group_size}")
        if not all(isinstance(n, int) for n in self.fourier_exponents):
            raise UserError(f"fourier_exponents must be integers, got {self.fourier_exponents!r}")
        super().__post_init__()

    def _batch_pieces(self, batch: int) -> int:
        """How many equal pieces the batch is processed in (a divisor of ``batch``)."""
        return max(d for d in range(1, min(self.batch_pieces, batch) + 1) if batch % d == 0)

    def _conditioning(
        self, gamma_t: jax.Array, labels: jax.Array | None, conditioning: jax.Array | None
    ) -> jax.Array:
        """Conditioning vector [B, 4 * n_embd] (``dtype``) from gamma_t, labels, conditioning
        (each [B]; the last float32, used when ``conditioning_input``)."""
        t = (gamma_t - self.gamma_min) / (self.gamma_max - self.gamma_min)
        emb = timestep_embedding(t, self.n_embd, scale=1000.0)  # float32 [B, n_embd]
        if self.num_classes > 0:
            label_emb = nn.Embed(
                self.num_classes + 1,
                self.n_embd,
                dtype=jnp.float32,
                param_dtype=_PARAM_DTYPE,
                name="label_embed",
            )(labels)
            emb = emb + label_emb
        if conditioning is not None:  # given exactly when conditioning_input
            emb = jnp.concatenate([emb, conditioning.reshape(emb.shape[0], -1)], axis=-1)
        for i in range(2):
            emb = nn.swish(
                nn.Dense(
                    4 * self.n_embd,
                    dtype=self.dtype,
                    param_dtype=_PARAM_DTYPE,
                    name=f"cond_dense_{i}",
                )(emb)
            )
        return emb

    def _check_inputs(self, z, gamma_t, labels) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Validate and broadcast the inputs; returns (z, gamma_t [B] float32, labels [B])."""
        z = jnp.asarray(z)
        if z.ndim != 4:
            raise UserError(f"z must have shape [B, H, W, C], got shape {z.shape}")
        if not jnp.issubdtype(z.dtype, jnp.floating):
            raise UserError(f"z must be a floating array, got dtype {z.dtype}")
        batch = z.shape[0]

        gamma_t = jnp.asarray(gamma_t, jnp.float32)
        if gamma_t.ndim == 0:
            gamma_t = jnp.broadcast_to(gamma_t, (batch,))
        elif gamma_t.shape != (batch,):
            raise UserError(
                f"gamma_t must be a scalar or have shape [B]=({batch},), got shape {gamma_t.shape}"
            )

        if self.num_classes == 0:
            if labels is not None:
                raise UserError(
                    "labels must be None when num_classes=0, got labels of shape "
                    f"{jnp.shape(labels)}: {labels!r}"
                )
            return z, gamma_t, None
        if labels is None:
            # All unconditional: the extra row num_classes.
            return z, gamma_t, jnp.full((batch,), self.num_classes, jnp.int32)
        labels = jnp.asarray(labels)
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise UserError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.ndim == 0:
            labels = jnp.broadcast_to(labels, (batch,))
        elif labels.shape != (batch,):
            raise UserError(
                f"labels must be a scalar or have shape [B]=({batch},), got shape {labels.shape}"
            )
        return z, gamma_t, labels

    def _check_conditioning(self, conditioning: jax.Array | None, batch: int) -> jax.Array | None:
        """Validate the scalar conditioning input; returns float32 [B] (zeros for None), or
        None without ``conditioning_input``."""
        if not self.conditioning_input:
            if conditioning is not None:
                raise UserError(
                    "conditioning must be None when conditioning_input=False, got an array of "
                    f"shape {jnp.shape(conditioning)}"
                )
            return None
        if conditioning is None:
            return jnp.zeros((batch,), jnp.float32)
        conditioning = jnp.asarray(conditioning, jnp.float32)
        if conditioning.ndim == 0:
            return jnp.broadcast_to(conditioning, (batch,))
        if conditioning.shape != (batch,):
            raise UserError(
                f"conditioning must be a scalar or have shape [B]=({batch},), got shape "
                f"{conditioning.shape}"
            )
        return conditioning

    @nn.compact
    def __call__(
        self,
        z: jax.Array,
        gamma_t: jax.Array | float,
        labels: jax.Array | None = None,
        *,
        conditioning: jax.Array | None = None,
        train: bool,
    ) -> jax.Array:
        """Predict the noise in ``z``.

        Args:
          z: float array [B, H, W, C], the noisy latent z_t.
          gamma_t: float scalar or array [B], gamma(t) = -log SNR(t) for each example; a
            scalar is broadcast to [B].
          labels: None, or int array [B] (or scalar) of class labels in ``[0, num_classes]``
            where ``num_classes`` means "unconditional". Must be None when ``num_classes`` is
            0; None with ``num_classes > 0`` means all-unconditional. Out-of-range labels are
            not checked (they may be traced): labels above ``num_classes`` give NaN outputs
            and negative ones index from the end (-1 is the unconditional row).
          conditioning: with ``conditioning_input``, float [B] (or scalar) concatenated to the
            embedding; None means zeros (e.g. "not augmented"). Must be None otherwise.
          train: if True, apply dropout using the 'dropout' rng; if False, deterministic.

        Returns:
          eps_hat: float32 array [B, H, W, C], equal to ``z + f(z)``; exactly ``z`` at
          initialisation since the output convolution is zero-initialised.
        """
        z, gamma_t, labels = self._check_inputs(z, gamma_t, labels)
        batch = z.shape[0]
        conditioning = self._check_conditioning(conditioning, batch)
        cond = self._conditioning(gamma_t, labels, conditioning)

        # With remat, each block's activations are recomputed in the backward pass; `train` is
        # the static argument (positional: jax.checkpoint traces keyword arguments).
        resnet_cls = nn.remat(ResNetBlock, static_argnums=(3,)) if self.remat else ResNetBlock
        attention_cls = (
            nn.remat(AttentionBlock, static_argnums=(2,)) if self.remat else AttentionBlock
        )

        def resnet_block(name):
            return resnet_cls(
                out_channels=self.n_embd,
                dropout_rate=self.dropout_rate,
                norm_groups=self.norm_groups,
                norm_min_group_size=self.norm_min_group_size,
                dtype=self.dtype,
                name=name,
            )

        def attention_block(name):
            return attention_cls(
                norm_groups=self.norm_groups,
                norm_min_group_size=self.norm_min_group_size,
                dtype=self.dtype,
                attention=self.attention,
                name=name,
            )

        conv_in = nn.Conv(
            self.n_embd,
            kernel_size=(3, 3),
            dtype=self.dtype,
            param_dtype=_PARAM_DTYPE,
            name="conv_in",
        )
        down = [resnet_block(f"down_block_{i}") for i in range(self.n_layer)]
        mid = [
            resnet_block("mid_block_1"),
            attention_block("mid_attn"),
            resnet_block("mid_block_2"),
        ]
        up = [resnet_block(f"up_block_{i}") for i in range(self.n_layer + 1)]
        down_attn = up_attn = [None] * len(up)
        if self.attention_everywhere:
            down_attn = [attention_block(f"down_attn_{i}") for i in range(self.n_layer)]
            up_attn = [attention_block(f"up_attn_{i}") for i in range(self.n_layer + 1)]
        norm_out = group_norm(
            self.n_embd, self.norm_groups, self.dtype, "norm_out", self.norm_min_group_size
        )
        conv_out = nn.Conv(
            z.shape[-1],
            kernel_size=(3, 3),
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=_PARAM_DTYPE,
            name="conv_out",
        )
        num_blocks = len(down) + 2 + len(up)
        keys = None
        if train and self.dropout_rate > 0.0:  # one key per example and block
            keys = jax.random.split(self.make_rng("dropout"), (batch, num_blocks))

        def network(z, cond, keys):  # f(z) for one piece of the batch
            block_keys = iter(range(num_blocks))

            def block(module, h):
                j = next(block_keys)
                return module(h, cond, train, None if keys is None else keys[:, j])

            h = z.astype(jnp.float32)
            if self.with_fourier_features and len(self.fourier_exponents) > 0:
                h = jnp.concatenate([h, base2_fourier_features(h, self.fourier_exponents)], axis=-1)
            h = conv_in(h)
            skips = [h]
            for block_module, attn in zip(down, down_attn, strict=False):
                h = block(block_module, h)
                if attn is not None:
                    h = attn(h, train)
                skips.append(h)
            h = block(mid[0], h)
            h = mid[1](h, train)
            h = block(mid[2], h)
            for block_module, attn in zip(up, up_attn, strict=True):
                h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)  # [.., 2*n_embd]
                h = block(block_module, h)
                if attn is not None:
                    h = attn(h, train)
            assert not skips
            return conv_out(nn.swish(norm_out(h)))

        pieces = self._batch_pieces(batch)
        size = batch // pieces
        f = jnp.concatenate(
            [
                network(
                    z[i * size : (i + 1) * size],
                    cond[i * size : (i + 1) * size],
                    None if keys is None else keys[i * size : (i + 1) * size],
                )
                for i in range(pieces)
            ]
        ) if pieces > 1 else network(z, cond, keys)  # fmt: skip
        return z.astype(jnp.float32) + f.astype(jnp.float32)
