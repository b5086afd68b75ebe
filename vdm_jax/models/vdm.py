"""The VDM model: a noise schedule and a score network, and the variational bound they define.

:class:`VDM` takes plain arguments (two Linen modules and a few numbers), so it can be built
from a config, by hand, or with a network of your own that has the ``ScoreUNet`` signature
``score_net(z, gamma_t, labels, train=...) -> eps_hat`` (and, when it takes a scalar
conditioning input, the keyword ``conditioning=``; it is passed only when given).

RNG streams used by ``VDM.__call__``: ``'diffusion'`` (times and noise) and, when
``train=True`` with dropout, ``'dropout'``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.errors import UserError
from vdm_jax.maths import diffusion, losses, schedules, weightings
from vdm_jax.models.unet import ScoreUNet

__all__ = [
    "SCHEDULES",
    "VDM",
    "ObjectiveTerms",
    "VLBTerms",
    "make_schedule",
    "register_schedule",
    "unregister_schedule",
]

Array = jax.Array

#: The noise schedules by name: name -> factory (a Linen module class, or any callable)
#: called ``factory(gamma_min, gamma_max)``, plus ``n_features=`` when it takes that keyword.
#: Read it; add to it with :func:`register_schedule`.
SCHEDULES: dict[str, Callable[..., nn.Module]] = {
    "fixed_linear": schedules.FixedLinearSchedule,
    "learned_linear": schedules.LearnedLinearSchedule,
    "monotonic": schedules.MonotonicSchedule,
    "monotonic_unnormalised": schedules.UnnormalisedMonotonicSchedule,
}
_BUILT_IN_SCHEDULES = frozenset(SCHEDULES)


class VLBTerms(NamedTuple):
    """The variational bound per example.

    Attributes:
      prior: KL(q(z_1|x) || N(0, I)), ``[B]`` float32, nats.
      reconstruction: -log p(x|z_0), ``[B]`` float32, nats.
      diffusion: the diffusion loss (continuous L_inf or discrete L_T), ``[B]`` float32, nats.
      bpd: the whole bound (sum of the three) in bits per dimension, ``[B]`` float32.
    """

    prior: Array
    reconstruction: Array
    diffusion: Array
    bpd: Array


class ObjectiveTerms(NamedTuple):
    """The training objective of a pass, next to its :class:`VLBTerms`.

    Attributes:
      objective: what training minimises, ``[B]`` float32, nats: prior + reconstruction + the
        weighted diffusion loss; the same values as the bound for the ELBO weighting with the
        schedule's uniform t.
      noise_bins: with adaptive noise levels, each example's bin, int32 ``[B]``; else None.
      noise_values: with adaptive noise levels, w(lambda) ||eps - eps_hat||^2 per example
        (no gradient), the statistic the noise-level histogram tracks, ``[B]``; else None.
    """

    objective: Array
    noise_bins: Array | None = None
    noise_values: Array | None = None


def _takes_features(factory) -> bool:
    return "n_features" in inspect.signature(factory).parameters


def register_schedule(name: str, factory: Callable[..., nn.Module]) -> None:
    """Adds a noise schedule under ``name``: :func:`make_schedule` builds it and a config's
    ``model.schedule`` accepts the name.

    Args:
      name: a new name (not one of :data:`SCHEDULES`).
      factory: a Linen module class (or a callable returning a module) called
        ``factory(gamma_min, gamma_max)``, plus ``n_features=`` (``model.schedule_features``)
        when it has that parameter. The module is called ``gamma = schedule(t)`` with t float32
        ``[B]`` or ``[]`` and returns gamma(t) of t's shape, increasing in t, and has an
        ``endpoints()`` method returning (gamma(0), gamma(1)); see
        :mod:`vdm_jax.maths.schedules`.

    Raises:
      UserError: the name is taken, or the factory is not callable with
        ``(gamma_min, gamma_max)``.
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"register_schedule: the name must be a non-empty string, got {name!r}")
    if name in SCHEDULES:
        raise UserError(f"register_schedule: the schedule {name!r} is already registered")
    try:
        inspect.signature(factory).bind(schedules.GAMMA_MIN, schedules.GAMMA_MAX)
    except (TypeError, ValueError):
        raise UserError(
            f"register_schedule: the factory of {name!r} must be callable as "
            f"factory(gamma_min, gamma_max), got {factory!r}"
        ) from None
    SCHEDULES[name] = factory


def unregister_schedule(name: str) -> None:
    """Removes a schedule added by :func:`register_schedule`.

    Raises:
      UserError: ``name`` was not registered, or is one of the built-in schedules.
    """
    if name in _BUILT_IN_SCHEDULES or name not in SCHEDULES:
        raise UserError(f"unregister_schedule: {name!r} is not a registered schedule")
    del SCHEDULES[name]


def make_schedule(
    kind: str,
    gamma_min: float = schedules.GAMMA_MIN,
    gamma_max: float = schedules.GAMMA_MAX,
    n_features: int = 1024,
) -> nn.Module:
    """A schedule module by name: 'fixed_linear', 'learned_linear', 'monotonic',
    'monotonic_unnormalised' (the original code's network, endpoints not pinned), or one added
    by :func:`register_schedule`.

    Args:
      kind: the schedule's name, one of :data:`SCHEDULES`.
      gamma_min, gamma_max: gamma(0) and gamma(1) (initial values when learned).
      n_features: hidden width of the monotonic networks (passed only to a factory that takes
        ``n_features``).
    """
    if kind not in SCHEDULES:
        raise UserError(f"unknown noise schedule {kind!r}; known: {sorted(SCHEDULES)}")
    factory = SCHEDULES[kind]
    if _takes_features(factory):
        return factory(gamma_min, gamma_max, n_features=n_features)
    return factory(gamma_min, gamma_max)


class VDM(nn.Module):
    """A Variational Diffusion Model: the bound on -log p(x) and the pieces samplers need.

    Attributes:
      score_net: eps-prediction network, called ``score_net(z, gamma_t, labels, train=...)``
        with z ``[B, H, W, C]`` float32 and gamma_t ``[B]``; :class:`~vdm_jax.models.unet.ScoreUNet`
        by default.
      schedule: a schedule module (see :mod:`vdm_jax.maths.schedules`); learned linear by default.
      vocab_size: V, the number of values a data dimension takes (256 for 8-bit images).
      num_steps: T; 0 means continuous time (the paper's default), T > 0 the discrete-time
        bound with times i/T.
      antithetic_time_sampling: draw the batch's times as (u + i/B) mod 1 (lower variance).
      variance_gradient: train the schedule's shape to minimise the variance of the diffusion
        loss (paper, appendix I.2); continuous time only.
      weighting: the weighting w(lambda) of the trained diffusion loss (a
        :class:`vdm_jax.maths.weightings.Weighting`; the ELBO's w = 1 by default). It is defined
        for the continuous-time loss: training with it in discrete time raises, and a
        discrete-time evaluation reports the bound as the objective. The bound in ``bpd`` is
        always the unweighted one. What trains the schedule when w is not 1: in expectation
        L_w = 1/2 int w(lambda) E||eps - eps_hat||^2 dlambda over [-gamma(1), -gamma(0)]
        depends on the schedule only through its endpoints, so gamma(0) balances the
        reconstruction term against that integrand at lambda = -gamma(0), and gamma(1) the
        prior term against it at -gamma(1): the bound's balance only where w = 1 there. The
        schedule's shape gets only noise (or, with ``variance_gradient``, the variance of
        L_w); with adaptive noise levels it is not used at all.
      parameterization: what ``score_net`` outputs: ``"eps"`` (the noise, the paper's),
        ``"v"`` (v = alpha eps - sigma x, Salimans & Ho 2022) or ``"x"`` (the data);
        :meth:`predict_noise` converts it to eps_hat with :func:`vdm_jax.maths.diffusion.to_eps`.
      reconstruction_window: 0 (default) computes the reconstruction term's normaliser over
        all V values; w > 0 sums it over the 2 w + 1 values nearest z_0 / alpha_0 whenever
        gamma(0) is low enough for the result to equal the full one to float32 rounding (see
        :func:`~vdm_jax.maths.losses.windowed_reconstruction_nll`): faster on CPUs (4 suits
        V = 256), not on accelerators.
    """

    score_net: nn.Module = ScoreUNet()
    schedule: nn.Module = schedules.LearnedLinearSchedule()
    vocab_size: int = 256
    num_steps: int = 0
    antithetic_time_sampling: bool = True
    variance_gradient: bool = False
    parameterization: str = "eps"
    weighting: weightings.Weighting = weightings.get_weighting("elbo")
    reconstruction_window: int = 0

    def __post_init__(self):
        if self.parameterization not in diffusion.PARAMETERIZATIONS:
            raise UserError(
                f"parameterization must be one of {diffusion.PARAMETERIZATIONS}, got "
                f"{self.parameterization!r}"
            )
        if self.vocab_size < 2:
            raise UserError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.num_steps < 0:
            raise UserError(f"num_steps must be 0 (continuous) or positive, got {self.num_steps}")
        if self.reconstruction_window < 0:
            raise UserError(
                f"reconstruction_window must be >= 0 (0: the full softmax), got "
                f"{self.reconstruction_window}"
            )
        if self.variance_gradient and self.num_steps:
            raise UserError(
                "variance_gradient needs the continuous-time loss (num_steps=0), got "
                f"num_steps={self.num_steps}"
            )
        super().__post_init__()

    def gamma(self, t: Array) -> Array:
        """gamma(t) for times in [0, 1] of any shape; float32."""
        return self.schedule(t)

    def endpoints(self) -> tuple[Array, Array]:
        """(gamma(0), gamma(1)), float32 scalars."""
        return self.schedule.endpoints()

    def predict_noise(
        self,
        z: Array,
        gamma_t: Array,
        labels: Array | None = None,
        *,
        conditioning: Array | None = None,
        train: bool = False,
    ) -> Array:
        """eps_hat for latents z ``[B, H, W, C]`` float32 at gamma_t (scalar or ``[B]``).

        The network's output is converted from the model's ``parameterization``.
        ``conditioning`` (float ``[B]``, e.g. the augmentation flag) is passed to score
        networks that take a scalar conditioning input; None leaves it out (zeros for
        :class:`~vdm_jax.models.unet.ScoreUNet`).
        """
        if conditioning is None:
            prediction = self.score_net(z, gamma_t, labels, train=train)
        else:
            prediction = self.score_net(z, gamma_t, labels, conditioning=conditioning, train=train)
        return diffusion.to_eps(prediction, z, gamma_t, self.parameterization)

    def decode_log_probs(self, z_0: Array) -> Array:
        """log p(x|z_0) over the vocabulary: ``z_0.shape + (vocab_size,)``, float32."""
        gamma_0, _ = self.endpoints()
        return losses.decoder_log_probs(z_0, gamma_0, self.vocab_size)

    def _times(self, batch: int) -> Array:
        key = self.make_rng("diffusion")
        if self.antithetic_time_sampling:
            return jnp.mod(jax.random.uniform(key, ()) + jnp.arange(batch) / batch, 1.0)
        return jax.random.uniform(key, (batch,))

    def __call__(
        self,
        images: Array,
        labels: Array | None = None,
        *,
        conditioning: Array | None = None,
        train: bool,
        num_steps: int | None = None,
        noise_level_probs: Array | None = None,
        return_objective: bool = False,
    ) -> VLBTerms | tuple[VLBTerms, ObjectiveTerms]:
        """The variational bound of a batch, one sample of (t, noise) per example.

        Args:
          images: integer data ``[B, H, W, C]`` (uint8 for images), values in 0..V-1.
          labels: int ``[B]`` class labels for a class-conditional score network, or None.
          conditioning: float ``[B]`` scalar conditioning input (the authors' augmentation
            flag) for a score network that takes one, or None (see :meth:`predict_noise`).
          train: dropout on or off.
          num_steps: overrides the module's T for this call (e.g. 1000 to evaluate the
            discrete-time bound of a model trained in continuous time); 0 is continuous.
          noise_level_probs: ``[K]`` bin probabilities of an adaptive noise-level density
            over [gamma(0), gamma(1)] (:func:`vdm_jax.maths.weightings.histogram_probs`); the noise
            levels are then drawn from it instead of the schedule's uniform t, and both the
            bound and the objective are importance-weighted (unbiased). Continuous time only.
          return_objective: also return the training objective of the same pass.

        Returns:
          :class:`VLBTerms`, each ``[B]``; with ``return_objective``, the pair
          ``(VLBTerms, ObjectiveTerms)``.
        """
        if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.integer):
            raise UserError(
                f"images must be integers [B, H, W, C], got shape {images.shape}, "
                f"dtype {images.dtype}"
            )
        num_steps = self.num_steps if num_steps is None else num_steps
        if num_steps < 0:
            raise UserError(f"num_steps must be 0 (continuous) or positive, got {num_steps}")
        if train and num_steps and not self.weighting.is_elbo:
            raise UserError(
                f"the {self.weighting.name!r} weighting needs the continuous-time loss "
                f"(num_steps=0) for training, got num_steps={num_steps}"
            )
        adaptive = noise_level_probs is not None
        if adaptive and (num_steps or self.variance_gradient):
            raise UserError(
                "adaptive noise levels need the continuous-time loss without the variance "
                f"gradient, got num_steps={num_steps}, variance_gradient={self.variance_gradient}"
            )
        batch = images.shape[0]
        x = diffusion.encode(images, self.vocab_size)
        gamma_0, gamma_1 = self.endpoints()
        key = self.make_rng("diffusion")
        eps_0, eps = jax.random.normal(key, (2, *x.shape))

        prior = losses.prior_kl(x, gamma_1)
        z_0 = diffusion.q_sample(x, gamma_0, eps_0)
        reconstruction = losses.windowed_reconstruction_nll(
            images, z_0, gamma_0, self.vocab_size, self.reconstruction_window,
            custom_gradient=train,
        )  # fmt: skip

        bins = density = values = None
        t = self._times(batch)
        if noise_level_probs is not None:
            gamma_t, density, bins = weightings.sample_from_histogram(
                noise_level_probs, gamma_0, gamma_1, t
            )
            dgamma_dt = 1.0 / density  # the histogram's inverse CDF as a schedule of t
        elif num_steps:
            t = jnp.ceil(t * num_steps) / num_steps  # i/T, i in 1..T
            t = jnp.maximum(t, 1.0 / num_steps)  # u = 0 exactly would give i = 0
            gamma_t = self.gamma(t)
            gamma_s = self.gamma(t - 1.0 / num_steps)
        elif self.variance_gradient:
            gamma_t, dgamma_dt, channel = schedules.gamma_with_variance_gradient(self.schedule, t)
        else:
            gamma_t, dgamma_dt = schedules.gamma_and_derivative(self.schedule, t)

        z_t = diffusion.q_sample(x, gamma_t, eps)
        eps_hat = self.predict_noise(z_t, gamma_t, labels, conditioning=conditioning, train=train)
        if num_steps:
            diff = losses.diffusion_loss_discrete(eps, eps_hat, gamma_s, gamma_t, num_steps)
            trained = diff
        elif self.weighting.is_elbo:
            diff = trained = losses.diffusion_loss_continuous(eps, eps_hat, dgamma_dt)
        else:
            weight = self.weighting(-gamma_t)
            diff = losses.diffusion_loss_continuous(eps, eps_hat, dgamma_dt)
            trained = losses.weighted_diffusion_loss(eps, eps_hat, gamma_t, dgamma_dt, weight)
        if self.variance_gradient:
            trained = schedules.emit_variance_gradient(trained, channel)
            diff = trained if self.weighting.is_elbo else diff
        if density is not None:  # adaptive
            # w ||eps - eps_hat||^2 = 2 trained / gamma'(t), without the importance weight.
            values = jax.lax.stop_gradient(2.0 * trained * density)

        num_dims = x.shape[1] * x.shape[2] * x.shape[3]
        bpd = losses.bits_per_dim(prior + reconstruction + diff, num_dims)
        terms = VLBTerms(prior, reconstruction, diff, bpd)
        if not return_objective:
            return terms
        return terms, ObjectiveTerms(prior + reconstruction + trained, bins, values)
