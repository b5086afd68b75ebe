"""MuLAN: a diffusion model with a learned per-pixel schedule conditioned on a latent.

MuLAN (Sahoo, Gokaslan, De Sa, Kuleshov, "Diffusion Models With Learned Adaptive Noise",
NeurIPS 2024, arXiv 2312.13236) infers an auxiliary latent c ~ q(c|x) from the image, draws a
schedule gamma(t, c) of the image's shape (:class:`~vdm_jax.maths.mulan.PolynomialSchedule`)
and conditions the score network on c. Its bound on -log p(x), per image, in nats:

    latent KL + KL(q(z_1|x, c) || N(0, I)) + -log p(x|z_0, c) + 1/2 E_t[sum_i gamma_i'(t)
    (eps_i - eps_hat_i)^2],

the last three per pixel with the pixel's own gamma (:mod:`vdm_jax.maths.losses` with a gamma
of the data's shape). The latent kinds are the authors' ``gaussian`` (a diagonal Gaussian
q(c|x) against p(c) = N(0, I): a true KL, so a true bound) and ``topk`` (a relaxed k-hot
embedding with their categorical-against-uniform KL term, which is not the KL of the
distribution the embedding is drawn from: the figure is their estimate of the bound, not a
proven one; see :func:`vdm_jax.maths.mulan.relaxed_topk`).

The score network (:class:`LatentConditionedUNet`) is the VDM U-Net given, as their ``vdm``
U-Net is, the mean of the per-pixel gamma over the image in place of gamma_t, with c
concatenated to its time embedding.

RNG streams of ``MuLAN.__call__``: ``'diffusion'`` (times, noise and the latent's draw)
and, with ``train=True``, ``'dropout'``.

Public names: :class:`MuLAN`, :class:`MuLANTerms`, :class:`LatentEncoder`,
:class:`LatentConditionedUNet`, ``LATENT_KINDS`` (``"topk"``, ``"gaussian"``),
:func:`ancestral_sample`, :func:`ddim_sample`.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.errors import UserError
from vdm_jax.maths import diffusion, losses
from vdm_jax.maths import mulan as mulan_maths
from vdm_jax.models.unet import (
    AttentionBlock,
    ResNetBlock,
    ScoreUNet,
    base2_fourier_features,
    group_norm,
    timestep_embedding,
)

Array = jax.Array

__all__ = [
    "LATENT_KINDS",
    "LatentConditionedUNet",
    "LatentEncoder",
    "MuLAN",
    "MuLANTerms",
    "ancestral_sample",
    "ddim_sample",
]

LATENT_KINDS = ("topk", "gaussian")


class LatentConditionedUNet(ScoreUNet):
    """:class:`~vdm_jax.models.unet.ScoreUNet` whose conditioning input is a latent vector.

    The latent c, float ``[B, latent_size]``, passed as ``conditioning=``, is concatenated to
    the time embedding (the first conditioning layer has ``n_embd + latent_size`` inputs), as
    MuLAN's ``z_conditioning``. ``conditioning_input`` is always on.

    Attributes:
      latent_size: D, the latent's size.
    """

    latent_size: int = 1
    conditioning_input: bool = True

    def __post_init__(self):
        if self.latent_size < 1:
            raise UserError(f"latent_size must be >= 1, got {self.latent_size}")
        if not self.conditioning_input:
            raise UserError("LatentConditionedUNet needs conditioning_input=True")
        super().__post_init__()

    def _check_conditioning(self, conditioning: Array | None, batch: int) -> Array:
        if conditioning is None:
            raise ValueError("conditioning (the latent c, [B, latent_size]) is required")
        conditioning = jnp.asarray(conditioning, jnp.float32)
        if conditioning.shape != (batch, self.latent_size):
            raise ValueError(
                f"conditioning must have shape [B, latent_size]=({batch}, {self.latent_size}), "
                f"got {conditioning.shape}"
            )
        return conditioning


class LatentEncoder(nn.Module):
    """The encoder q(c|x) of MuLAN: a U-Net's first half and a dense head.

    conv_in (of x and its Fourier features) -> ``n_layer`` ResNet blocks -> ResNet block,
    self-attention, ResNet block -> GroupNorm, swish, 3x3 conv to 1 channel, swish, flattened
    to ``[B, H * W]`` -> Dense. Every block is conditioned on one learned constant vector (the
    authors' encoder embeds time 0 and a zero conditioning input). Output: ``kind="topk"``: the
    logits ``[B, latent_size]``; ``"gaussian"``: (mean, variance), each ``[B, latent_size]``,
    the variance through a softplus.

    Attributes:
      latent_size: D.
      kind: one of ``LATENT_KINDS`` (``"topk"``, ``"gaussian"``).
      n_layer: ResNet blocks before the middle (their ``forward_n_layer``).
      n_embd: channels of every block (their ``sm_n_embd``).
      dropout_rate: inside every block, when ``train``.
      attention_everywhere: self-attention after every block before the middle.
      with_fourier_features, fourier_exponents, norm_groups, norm_min_group_size: as in
        :class:`~vdm_jax.models.unet.ScoreUNet`.
    """

    latent_size: int
    kind: str = "topk"
    n_layer: int = 4
    n_embd: int = 128
    dropout_rate: float = 0.1
    attention_everywhere: bool = False
    with_fourier_features: bool = True
    fourier_exponents: tuple[int, ...] = (6, 7)
    norm_groups: int = 32
    norm_min_group_size: int = 1

    def __post_init__(self):
        if self.kind not in LATENT_KINDS:
            raise UserError(f"latent kind must be one of {LATENT_KINDS}, got {self.kind!r}")
        if self.latent_size < 1:
            raise UserError(f"latent_size must be >= 1, got {self.latent_size}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array | tuple[Array, Array]:
        """q(c|x)'s parameters from encoded images x, float ``[B, H, W, C]`` in [-1, 1]."""
        batch = x.shape[0]
        emb = timestep_embedding(jnp.zeros((1,), jnp.float32), self.n_embd)
        emb = jnp.concatenate([emb, jnp.zeros((1, 1), jnp.float32)], axis=-1)
        for i in range(2):
            emb = nn.swish(nn.Dense(4 * self.n_embd, name=f"cond_dense_{i}")(emb))
        cond = jnp.broadcast_to(emb, (batch, emb.shape[-1]))

        def block(name):
            return ResNetBlock(
                out_channels=self.n_embd,
                dropout_rate=self.dropout_rate,
                norm_groups=self.norm_groups,
                norm_min_group_size=self.norm_min_group_size,
                name=name,
            )

        def attention(name):
            return AttentionBlock(
                norm_groups=self.norm_groups,
                norm_min_group_size=self.norm_min_group_size,
                name=name,
            )

        h = x.astype(jnp.float32)
        if self.with_fourier_features and self.fourier_exponents:
            h = jnp.concatenate([h, base2_fourier_features(h, self.fourier_exponents)], axis=-1)
        h = nn.Conv(self.n_embd, kernel_size=(3, 3), name="conv_in")(h)
        for i in range(self.n_layer):
            h = block(f"down_block_{i}")(h, cond, train)
            if self.attention_everywhere:
                h = attention(f"down_attn_{i}")(h, train)
        h = block("mid_block_1")(h, cond, train)
        h = attention("mid_attn")(h, train)
        h = block("mid_block_2")(h, cond, train)
        norm = group_norm(
            self.n_embd, self.norm_groups, jnp.float32, "norm_out", self.norm_min_group_size
        )
        h = nn.swish(norm(h))
        h = nn.Conv(1, kernel_size=(3, 3), kernel_init=nn.initializers.zeros, name="conv_out")(h)
        h = nn.swish(h.reshape(batch, -1))
        if self.kind == "topk":
            return nn.Dense(self.latent_size, name="dense_layer_final")(h)
        mean = nn.Dense(self.latent_size, name="dense_layer_final_mu")(h)
        var = nn.softplus(nn.Dense(self.latent_size, name="dense_layer_final_sigma")(h))
        return mean, var


class MuLANTerms(NamedTuple):
    """MuLAN's bound per image, each ``[B]`` float32, nats (``bpd`` in bits/dim).

    Attributes:
      latent: the latent's KL term (gaussian: KL(q(c|x) || N(0, I)); topk: the authors'
        categorical-against-uniform term, see :func:`vdm_jax.maths.mulan.relaxed_topk`).
      prior: KL(q(z_1|x, c) || N(0, I)), per pixel, summed.
      reconstruction: -log p(x|z_0, c).
      diffusion: the continuous-time diffusion loss with the per-pixel rates.
      bpd: the sum of the four in bits per dimension.
    """

    latent: Array
    prior: Array
    reconstruction: Array
    diffusion: Array
    bpd: Array


class MuLAN(nn.Module):
    """A MuLAN model: encoder, per-pixel schedule and latent-conditioned score network.

    Attributes:
      score_net: a :class:`LatentConditionedUNet` (or a network with its signature
        ``score_net(z, gamma [B], conditioning=c, train=...)``).
      schedule: a :class:`~vdm_jax.maths.mulan.PolynomialSchedule` (``schedule(c, t)`` and
        ``gamma_and_derivative(c, t)``, ``[B, H, W, C]``).
      encoder: a :class:`LatentEncoder` of the same ``kind`` and ``latent_size``.
      latent_k: k of the ``topk`` latent (entries set per row).
      parameterization: what ``score_net`` outputs: ``"eps"`` or ``"v"``.
      vocab_size: V.
      antithetic_time_sampling: the batch's times (u + i/B) mod 1.
    """

    score_net: nn.Module
    schedule: nn.Module
    encoder: LatentEncoder
    latent_k: int = 1
    parameterization: str = "v"
    vocab_size: int = 256
    antithetic_time_sampling: bool = True

    def __post_init__(self):
        if self.parameterization not in ("eps", "v"):
            raise UserError(f"parameterization must be 'eps' or 'v', got {self.parameterization!r}")
        if self.encoder.kind == "topk" and not 1 <= self.latent_k <= self.encoder.latent_size:
            raise UserError(
                f"latent_k must be in [1, latent_size={self.encoder.latent_size}], got "
                f"{self.latent_k}"
            )
        super().__post_init__()

    @property
    def latent_kind(self) -> str:
        """The latent's kind, one of ``LATENT_KINDS`` (``"topk"``, ``"gaussian"``)."""
        return self.encoder.kind

    def gamma(self, t: Array, c: Array) -> Array:
        """gamma(t, c), float32 ``[B, H, W, C]``; t scalar or ``[B]``, c ``[B, D]``."""
        return self.schedule(c, t)

    def endpoints(self) -> tuple[Array, Array]:
        """(gamma(0), gamma(1)) of every pixel, float32 scalars: the schedule's fixed
        ``gamma_min`` and ``gamma_max``, whatever c."""
        return (
            jnp.asarray(self.schedule.gamma_min, jnp.float32),
            jnp.asarray(self.schedule.gamma_max, jnp.float32),
        )

    def gamma_and_derivative(self, t: Array, c: Array) -> tuple[Array, Array]:
        """(gamma(t, c), d gamma / dt), each float32 ``[B, H, W, C]``, the rate exact."""
        return self.schedule.gamma_and_derivative(c, t)

    def _network(self, z: Array, gamma_pixels: Array, c: Array, train: bool) -> Array:
        gamma_mean = jnp.mean(gamma_pixels, axis=tuple(range(1, gamma_pixels.ndim)))
        return self.score_net(z, gamma_mean, conditioning=c, train=train)

    def predict_noise(self, z: Array, gamma_pixels: Array, c: Array, train: bool = False) -> Array:
        """eps_hat for latents z ``[B, H, W, C]`` at a per-pixel gamma of the same shape.

        The network sees the mean of ``gamma_pixels`` over each image and the latent c
        ``[B, D]``; a v output is converted with the per-pixel alpha, sigma
        (eps_hat = sigma z + alpha v_hat).
        """
        prediction = self._network(z, gamma_pixels, c, train)
        return diffusion.to_eps(prediction, z, gamma_pixels, self.parameterization)

    def encode(self, images: Array, train: bool = False) -> Array | tuple[Array, Array]:
        """The encoder's output for integer images ``[B, H, W, C]``: topk logits ``[B, D]``,
        or the gaussian (mean, var), each ``[B, D]``."""
        return self.encoder(diffusion.encode(images, self.vocab_size), train=train)

    def draw_latent(self, images: Array, key: Array, train: bool = False) -> tuple[Array, Array]:
        """A draw of c ~ q(c|x) and the latent's KL term, as the authors draw them.

        Returns:
          (c ``[B, D]`` float32, KL term ``[B]`` nats). gaussian: c = mean + sqrt(var) noise
          with the true KL; topk: c = :func:`~vdm_jax.maths.mulan.relaxed_topk` of the
          logits plus :func:`~vdm_jax.maths.mulan.topk_noise`, with
          :func:`~vdm_jax.maths.mulan.categorical_uniform_kl` of the logits.
        """
        out = self.encode(images, train)
        if isinstance(out, tuple):  # gaussian: (mean, var)
            mean, var = out
            c = mean + jnp.sqrt(var) * jax.random.normal(key, mean.shape)
            return c, mulan_maths.gaussian_kl(mean, var)
        noise = mulan_maths.topk_noise(key, self.latent_k, out.shape)
        c = mulan_maths.relaxed_topk(out + noise, self.latent_k)
        return c, mulan_maths.categorical_uniform_kl(out)

    def draw_latent_with_log_ratio(self, images: Array, key: Array) -> tuple[Array, Array]:
        """A draw of c ~ q(c|x) for a gaussian latent and log q(c|x) - log p(c) of that draw.

        Its mean over q is the KL of :meth:`draw_latent`; per draw it is what importance
        weights p(c) / q(c|x) need. A topk latent (a relaxed k-hot) has no such density.

        Returns:
          (c ``[B, D]`` float32, log q(c|x) - log p(c) ``[B]`` nats).
        """
        if self.latent_kind != "gaussian":
            raise UserError(f"a {self.latent_kind} latent has no density q(c|x) to weigh draws by")
        mean, var = self.encode(images)
        noise = jax.random.normal(key, mean.shape)
        c = mean + jnp.sqrt(var) * noise
        return c, 0.5 * jnp.sum(jnp.square(c) - jnp.square(noise) - jnp.log(var), axis=-1)

    def mean_latent(self, images: Array) -> Array:
        """c without the draw's noise: the gaussian mean, or the k-hot of the top-k logits."""
        out = self.encode(images)
        if isinstance(out, tuple):  # gaussian: (mean, var)
            return out[0]
        return jax.lax.stop_gradient(mulan_maths.relaxed_topk(out, self.latent_k))

    def prior_latent(self, batch: int) -> Array:
        """The authors' deterministic latent for sampling, ``[B, D]``: zeros (gaussian, the
        prior's mean), or ones in the first k entries (topk)."""
        size = self.encoder.latent_size
        if self.latent_kind == "gaussian":
            return jnp.zeros((batch, size), jnp.float32)
        return jnp.broadcast_to(
            (jnp.arange(size) < self.latent_k).astype(jnp.float32), (batch, size)
        )

    def sample_prior_latent(self, key: Array, batch: int) -> Array:
        """c ~ p(c), ``[B, D]``: N(0, I) (gaussian), or a uniformly chosen k-hot (topk)."""
        size = self.encoder.latent_size
        if self.latent_kind == "gaussian":
            return jax.random.normal(key, (batch, size))
        scores = jax.random.uniform(key, (batch, size))
        kth = jax.lax.top_k(scores, self.latent_k)[0][:, -1:]
        return (scores >= kth).astype(jnp.float32)

    def decode_log_probs(self, z_0: Array, c: Array) -> Array:
        """log p(x|z_0, c) over the vocabulary: ``z_0.shape + (V,)``, float32."""
        gamma_0 = self.gamma(jnp.zeros((z_0.shape[0],)), c)
        return losses.decoder_log_probs(z_0, gamma_0, self.vocab_size)

    def __call__(
        self,
        images: Array,
        labels: None = None,
        *,
        train: bool,
        num_steps: int | None = None,
    ) -> MuLANTerms:
        """The bound of a batch of integer images ``[B, H, W, C]``: one draw of the latent, of
        t (antithetic over the batch) and of the noises per image.

        ``labels`` and ``num_steps`` are there so that the call reads as a
        :class:`~vdm_jax.models.vdm.VDM`'s (``model.init(keys, images, labels, train=...)``):
        MuLAN is unconditional (labels must be None) and its bound is the continuous-time one
        (``num_steps`` None or 0).
        """
        if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.integer):
            raise ValueError(
                f"images must be integers [B, H, W, C], got shape {images.shape}, "
                f"dtype {images.dtype}"
            )
        if labels is not None:
            raise UserError("MuLAN is unconditional: labels must be None")
        if num_steps:
            raise UserError(
                f"MuLAN's bound is the continuous-time one: num_steps must be None or 0, got "
                f"{num_steps}"
            )
        batch = images.shape[0]
        x = diffusion.encode(images, self.vocab_size)
        key_t, key_c, key_noise = jax.random.split(self.make_rng("diffusion"), 3)
        c, latent_kl = self.draw_latent(images, key_c, train)
        if self.antithetic_time_sampling:
            t = jnp.mod(jax.random.uniform(key_t, ()) + jnp.arange(batch) / batch, 1.0)
        else:
            t = jax.random.uniform(key_t, (batch,))
        gamma_0 = self.gamma(jnp.zeros_like(t), c)
        gamma_1 = self.gamma(jnp.ones_like(t), c)
        gamma_t, dgamma_dt = self.gamma_and_derivative(t, c)
        eps_0, eps = jax.random.normal(key_noise, (2, *x.shape))

        prior = losses.prior_kl(x, gamma_1)
        z_0 = diffusion.q_sample(x, gamma_0, eps_0)
        reconstruction = losses.reconstruction_nll(images, z_0, gamma_0, self.vocab_size)
        z_t = diffusion.q_sample(x, gamma_t, eps)
        prediction = self._network(z_t, gamma_t, c, train)
        if self.parameterization == "v":
            v = diffusion.from_eps(eps, z_t, gamma_t, "v")
            diff = losses.diffusion_loss_continuous_v(v, prediction, gamma_t, dgamma_dt)
        else:
            diff = losses.diffusion_loss_continuous(eps, prediction, dgamma_dt)
        num_dims = x.shape[1] * x.shape[2] * x.shape[3]
        bpd = losses.bits_per_dim(latent_kl + prior + reconstruction + diff, num_dims)
        return MuLANTerms(latent_kl, prior, reconstruction, diff, bpd)


def _latent(model: MuLAN, key: Array, batch: int, latent: str | Array) -> Array:
    if isinstance(latent, str):
        if latent == "prior":
            return model.sample_prior_latent(key, batch)
        if latent == "deterministic":
            return model.prior_latent(batch)
        raise UserError(f"latent must be 'prior', 'deterministic' or an array, got {latent!r}")
    return jnp.asarray(latent, jnp.float32)


def _sample(model, variables, key, shape, num_steps, latent, step):
    if num_steps < 1:
        raise UserError(f"num_steps must be a positive integer, got {num_steps}")
    key_c, key_z, key_loop = jax.random.split(key, 3)
    c = _latent(model, key_c, shape[0], latent)
    z = jax.random.normal(key_z, shape)

    def gamma(t):
        return model.apply(variables, jnp.full((shape[0],), t), c, method=model.gamma)

    def body(i, z_t):
        t, s = (num_steps - i) / num_steps, (num_steps - i - 1) / num_steps
        gamma_t, gamma_s = gamma(t), gamma(s)
        eps_hat = model.apply(variables, z_t, gamma_t, c, method=model.predict_noise)
        return step(z_t, eps_hat, gamma_s, gamma_t, jax.random.fold_in(key_loop, i))

    z_0 = jax.lax.fori_loop(0, num_steps, body, z)
    log_probs = model.apply(variables, z_0, c, method=model.decode_log_probs)
    return jnp.argmax(log_probs, axis=-1).astype(jnp.uint8)


def ancestral_sample(
    model: MuLAN,
    variables,
    key: Array,
    shape: tuple[int, int, int, int],
    num_steps: int,
    latent: str | Array = "prior",
) -> Array:
    """Images from MuLAN's ancestral sampler with per-pixel alphas (T steps of p(z_s|z_t, c)).

    Args:
      model, variables: a :class:`MuLAN` and its variables.
      key: a PRNG key.
      shape: (B, H, W, C) of the images.
      num_steps: T, steps from t = 1 to 0.
      latent: ``"prior"`` (c ~ p(c)), ``"deterministic"`` (the authors' sampler's fixed
        embedding, :meth:`MuLAN.prior_latent`) or an array c ``[B, D]``.

    Returns:
      uint8 ``shape``: the decoder's most probable value of every pixel.
    """

    def step(z_t, eps_hat, gamma_s, gamma_t, key):
        noise = jax.random.normal(key, z_t.shape)
        return diffusion.ancestral_step(z_t, eps_hat, gamma_s, gamma_t, noise)

    return _sample(model, variables, key, shape, num_steps, latent, step)


def ddim_sample(
    model: MuLAN,
    variables,
    key: Array,
    shape: tuple[int, int, int, int],
    num_steps: int,
    latent: str | Array = "prior",
) -> Array:
    """Images from the deterministic DDIM sampler with per-pixel alphas:
    z_s = alpha_s x_hat + sigma_s eps_hat at each pixel's own gamma. Arguments and result
    as :func:`ancestral_sample`."""

    def step(z_t, eps_hat, gamma_s, gamma_t, key):
        del key
        x_hat = diffusion.predict_x(z_t, eps_hat, gamma_t)
        alpha_s, sigma_s = diffusion.alpha_sigma(gamma_s)
        return alpha_s * x_hat + sigma_s * eps_hat

    return _sample(model, variables, key, shape, num_steps, latent, step)
