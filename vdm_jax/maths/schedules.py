"""Noise schedules gamma(t) = -log SNR(t), t in [0, 1], monotonic in t.

Every schedule here is written as gamma(t) = gamma_0 + span * shape(t) with span >= 0 and
shape(0) = 0, shape(1) = 1 exactly, non-decreasing: the endpoints (gamma_0, gamma_1 =
gamma_0 + span) and the shape are separate, which is what the variance-minimising gradient
of the paper (appendix I.2) needs and what makes gamma(0), gamma(1) equal the endpoints to
the last bit for every parameter value.

The schedule modules are Flax Linen modules called as ``gamma = schedule(t)`` for ``t`` of
any shape; they also expose ``endpoints()`` and ``shape(t)``.

Switching on the variance-minimising schedule gradient in your own loss::

    gamma_t, dgamma_dt, channel = gamma_with_variance_gradient(schedule, t)  # t: [B]
    eps_hat = score_net(q_sample(x, gamma_t, eps), gamma_t)
    l_diff = diffusion_loss_continuous(eps, eps_hat, dgamma_dt)          # [B], nats
    l_diff = emit_variance_gradient(l_diff, channel)
    loss = jnp.mean(prior + recon + l_diff)                              # differentiate this

With it, in one backward pass, the schedule's shape parameters receive the gradient of
``mean(l_diff ** 2)`` (its variance up to a term constant in the shape, since in continuous
time E[l_diff] depends only on the endpoints) scaled like ``loss``, while the endpoints, the
score network and everything else receive the gradient of ``loss`` itself. It is meant for the
continuous-time loss; in discrete time the expected loss depends on the shape too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.errors import UserError

__all__ = [
    "GAMMA_MAX",
    "GAMMA_MIN",
    "DenseMonotone",
    "FixedLinearSchedule",
    "LearnedLinearSchedule",
    "MonotonicSchedule",
    "Schedule",
    "ShiftedSchedule",
    "UnnormalisedMonotonicSchedule",
    "emit_variance_gradient",
    "fixed_linear",
    "gamma_and_derivative",
    "gamma_with_variance_gradient",
]

Array = jax.Array

GAMMA_MIN = -13.3
GAMMA_MAX = 5.0


def fixed_linear(t: Array, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX) -> Array:
    """The linear schedule gamma(t) = gamma_min + (gamma_max - gamma_min) t.

    Args:
      t: times in [0, 1], any shape, float.
      gamma_min, gamma_max: the endpoints gamma(0) and gamma(1), gamma_min < gamma_max.

    Returns:
      gamma, ``t.shape``, float32.
    """
    _check_endpoints(gamma_min, gamma_max)
    return gamma_min + (gamma_max - gamma_min) * jnp.asarray(t, jnp.float32)


def _check_endpoints(gamma_min: float, gamma_max: float) -> None:
    if not gamma_min < gamma_max:
        raise UserError(
            f"gamma_min must be below gamma_max, got gamma_min={gamma_min}, gamma_max={gamma_max}"
        )


def _compose(gamma_0: Array, span: Array, shape: Array | float) -> Array:
    """gamma_0 + span * shape: exactly gamma_0 at shape 0 and gamma_0 + span at shape 1."""
    return gamma_0 + span * shape


class _Composed(nn.Module):
    """gamma(t) = gamma_0 + span * shape(t) from ``start_and_span()`` and ``shape(t)``; no
    fields, so that a schedule without default endpoints (a wrapper) can share it."""

    def start_and_span(self) -> tuple[Array, Array]:
        """(gamma(0), gamma(1) - gamma(0)) as float32 scalars, the span >= 0."""
        raise NotImplementedError

    def shape(self, t: Array) -> Array:
        """The normalised shape: 0 at t = 0, 1 at t = 1, non-decreasing; ``t.shape``."""
        return jnp.asarray(t, jnp.float32)

    def endpoints(self) -> tuple[Array, Array]:
        """(gamma(0), gamma(1)) as float32 scalars, exactly what ``__call__`` gives at 0 and 1."""
        gamma_0, span = self.start_and_span()
        return gamma_0, _compose(gamma_0, span, 1.0)

    def __call__(self, t: Array) -> Array:
        """gamma(t) for times ``t`` in [0, 1] of any shape; float32, ``t.shape``."""
        gamma_0, span = self.start_and_span()
        return _compose(gamma_0, span, self.shape(t))


class _Schedule(_Composed):
    """A schedule with initial (or fixed) endpoints ``gamma_min`` = gamma(0), ``gamma_max`` =
    gamma(1)."""

    gamma_min: float = GAMMA_MIN
    gamma_max: float = GAMMA_MAX


class FixedLinearSchedule(_Schedule):
    """The linear schedule with fixed endpoints (no parameters).

    Attributes:
      gamma_min: gamma(0), the least noise (default -13.3).
      gamma_max: gamma(1), the most noise (default 5.0).
    """

    def start_and_span(self) -> tuple[Array, Array]:
        _check_endpoints(self.gamma_min, self.gamma_max)
        return jnp.float32(self.gamma_min), jnp.float32(self.gamma_max - self.gamma_min)


class LearnedLinearSchedule(_Schedule):
    """The linear schedule with learned endpoints, as in the paper's main experiments.

    Parameters: ``gamma_min`` (gamma(0)) and ``gamma_range`` (gamma(1) = gamma(0) +
    ``|gamma_range|``), initialised from the attributes below; monotonic for every parameter value.

    Attributes:
      gamma_min, gamma_max: initial endpoints (defaults -13.3 and 5.0).
    """

    def setup(self):
        _check_endpoints(self.gamma_min, self.gamma_max)
        self.gamma_0 = self.param("gamma_min", nn.initializers.constant(self.gamma_min), ())
        self.gamma_range = self.param(
            "gamma_range", nn.initializers.constant(self.gamma_max - self.gamma_min), ()
        )

    def start_and_span(self) -> tuple[Array, Array]:
        return self.gamma_0, jnp.abs(self.gamma_range)


class DenseMonotone(nn.Module):
    """A dense layer whose effective kernel is ``|kernel|``, so it is non-decreasing in its input.

    Computed at the highest matmul precision: on TPUs the default would round to bfloat16.

    Attributes:
      features: output width.
      use_bias: whether to add a bias.
      kernel_init: initialiser of the raw kernel (its absolute value is used).
      bias_init: initialiser of the bias.
    """

    features: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.normal(stddev=1.0)
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x ``[N, D_in]`` float32 -> ``[N, features]`` float32."""
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        y = jnp.dot(x, jnp.abs(kernel), precision=jax.lax.Precision.HIGHEST)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,))
        return y


class MonotonicSchedule(LearnedLinearSchedule):
    """The paper's monotonic network schedule, with exact learned endpoints.

    The shape is f(t) = t + l3(phi(l2(2t - 1))) / n_features, with ``DenseMonotone`` layers
    l2 (width ``n_features``) and l3 (one output, no bias) and phi(h) = 2 sigmoid(h) - 1, so f
    is strictly increasing; it is normalised to shape(t) = (f(t) - f(0)) / (f(1) - f(0)), which
    is 0 at t = 0 and 1 at t = 1 to the last bit. gamma(t) = gamma_0 + ``|gamma_range|`` shape(t)
    with the endpoint parameters of :class:`LearnedLinearSchedule`. The reference network's
    endpoints drift during training because it has no such normalisation; here they are
    exactly the learned parameters.

    l3's kernel starts at zero, so the schedule starts as the linear one exactly; the
    derivative of ``|w|`` at w = 0 is 1 in JAX, so l3 still receives gradients from the first step.

    Attributes:
      gamma_min, gamma_max: initial endpoints (defaults -13.3 and 5.0).
      n_features: width of the hidden layer (1024 in the paper).
    """

    n_features: int = 1024

    def setup(self):
        super().setup()
        self.l2 = DenseMonotone(self.n_features)
        self.l3 = DenseMonotone(1, use_bias=False, kernel_init=nn.initializers.zeros)

    def shape(self, t: Array) -> Array:
        t = jnp.asarray(t, jnp.float32)
        # One pass over t and the two endpoints together.
        inputs = jnp.concatenate([t.reshape(-1), jnp.array([0.0, 1.0], jnp.float32)])[:, None]
        hidden = 2.0 * jax.nn.sigmoid(self.l2(2.0 * inputs - 1.0)) - 1.0
        f = inputs[:, 0] + self.l3(hidden)[:, 0] / self.n_features
        f_t, f_0, f_1 = f[:-2], f[-2], f[-1]
        ratio = ((f_t - f_0) / (f_1 - f_0)).reshape(t.shape)
        # XLA may round the rows of one matmul differently (vector body versus remainder), so
        # f at t = 1 need not equal f_1 to the last bit. Pin the value to [0, 1] and to exactly
        # 0 and 1 at the ends, keeping the gradient of `ratio` everywhere (the correction is
        # exact in float arithmetic: it differs from `ratio` by an ulp or two).
        exact = jnp.where(t <= 0.0, 0.0, jnp.where(t >= 1.0, 1.0, jnp.clip(ratio, 0.0, 1.0)))
        return ratio + jax.lax.stop_gradient(exact - ratio)


class ShiftedSchedule(_Composed):
    """A schedule shifted for resolution (Hoogeboom et al. 2023, simple diffusion).

    log SNR_shifted(t) = log SNR(t) + 2 log(reference_resolution / resolution), i.e.
    gamma_shifted(t) = gamma(t) - 2 log(reference_resolution / resolution): images larger than
    the reference get more noise at every t, so that the coarse structure a downsampled copy
    would see is noised as at the reference resolution. Shape and span are the wrapped
    schedule's; only gamma(0) moves, so the endpoints stay exact and the variance gradient
    (:func:`gamma_with_variance_gradient`) works through it.

    Attributes:
      schedule: any schedule of this module (``start_and_span()`` and ``shape(t)``).
      resolution: d, the side of the images trained on (pixels), positive.
      reference_resolution: d_ref, the side the wrapped schedule was designed for.
    """

    schedule: nn.Module
    resolution: float
    reference_resolution: float

    @property
    def shift(self) -> float:
        """The change of gamma, -2 log(d_ref / d) (negative for images above the reference)."""
        if not (self.resolution > 0 and self.reference_resolution > 0):
            raise UserError(
                "resolution and reference_resolution must be positive, got "
                f"{self.resolution} and {self.reference_resolution}"
            )
        return -2.0 * math.log(self.reference_resolution / self.resolution)

    def start_and_span(self) -> tuple[Array, Array]:
        """(gamma(0), gamma(1) - gamma(0)): the wrapped schedule's, gamma(0) shifted."""
        gamma_0, span = self.schedule.start_and_span()
        return gamma_0 + jnp.float32(self.shift), span

    def shape(self, t: Array) -> Array:
        """The wrapped schedule's normalised shape; ``t.shape``."""
        return self.schedule.shape(t)


class UnnormalisedMonotonicSchedule(_Schedule):
    """The original VDM code's network schedule (its ``learnable_nnet``), endpoints not pinned.

    gamma(t) = l1(t) + l3(phi(l2(2t - 1))) / n_features with ``DenseMonotone`` layers l1 (one
    output, kernel initialised to ``gamma_max - gamma_min`` and bias to ``gamma_min``), l2
    (width ``n_features``) and l3 (one output, no bias), phi(h) = 2 (sigmoid(h) - 1/2). It is
    non-decreasing, but gamma(0) and gamma(1) are wherever training moved them. This is the
    schedule of checkpoints imported from that code, so that they compute the gamma their
    authors computed; for new models :class:`MonotonicSchedule` (exact learned endpoints) is
    the better choice.

    Parameters: ``l1`` {kernel [1, 1], bias [1]}, ``l2`` {kernel [1, n], bias [n]}, ``l3``
    {kernel [n, 1]}, named and shaped as in the original code.

    Attributes:
      gamma_min, gamma_max: initial gamma(0) and gamma(1) of l1 (defaults -13.3 and 5.0).
      n_features: width of the hidden layer (1024 in the original code).
    """

    n_features: int = 1024

    def setup(self):
        _check_endpoints(self.gamma_min, self.gamma_max)
        self.l1 = DenseMonotone(
            1,
            kernel_init=nn.initializers.constant(self.gamma_max - self.gamma_min),
            bias_init=nn.initializers.constant(self.gamma_min),
        )
        self.l2 = DenseMonotone(self.n_features, kernel_init=nn.initializers.normal(0.01))
        self.l3 = DenseMonotone(1, use_bias=False, kernel_init=nn.initializers.normal(0.01))

    def _gamma(self, t: Array) -> Array:
        t = jnp.asarray(t, jnp.float32)
        column = t.reshape(-1, 1)
        hidden = 2.0 * (jax.nn.sigmoid(self.l2(2.0 * (column - 0.5))) - 0.5)
        gamma = self.l1(column) + self.l3(hidden) / self.n_features
        return gamma.reshape(t.shape)

    def __call__(self, t: Array) -> Array:
        """gamma(t) for times ``t`` in [0, 1] of any shape; float32, ``t.shape``."""
        return self._gamma(t)

    def endpoints(self) -> tuple[Array, Array]:
        """(gamma(0), gamma(1)) as float32 scalars."""
        ends = self._gamma(jnp.array([0.0, 1.0], jnp.float32))
        return ends[0], ends[1]

    def start_and_span(self) -> tuple[Array, Array]:
        gamma_0, gamma_1 = self.endpoints()
        return gamma_0, gamma_1 - gamma_0

    def shape(self, t: Array) -> Array:
        gamma_0, span = self.start_and_span()
        return (self._gamma(t) - gamma_0) / span


Schedule = (
    FixedLinearSchedule
    | LearnedLinearSchedule
    | MonotonicSchedule
    | ShiftedSchedule
    | UnnormalisedMonotonicSchedule
)


def gamma_and_derivative(schedule_fn: Callable[[Array], Array], t: Array) -> tuple[Array, Array]:
    """gamma(t) and dgamma/dt at once, by one forward-mode product (jvp).

    Args:
      schedule_fn: an elementwise function t -> gamma(t), e.g. a bound schedule module or
        ``lambda t: schedule.apply(params, t)``.
      t: times, any shape, float32.

    Returns:
      ``(gamma, dgamma_dt)``, each ``t.shape``, float32.
    """
    t = jnp.asarray(t, jnp.float32)
    return jax.jvp(schedule_fn, (t,), (jnp.ones_like(t),))


@jax.custom_vjp
def _tap(shape: Array, dshape: Array) -> tuple[Array, Array, Array]:
    return shape, dshape, jnp.zeros_like(shape)


def _tap_fwd(shape, dshape):
    return _tap(shape, dshape), None


def _tap_bwd(_, cotangents):
    # The channel's cotangent is 2 L_i, sent back by `emit_variance_gradient`; scaling the
    # shape's cotangent c_i dL_i/dshape by it gives c_i d(L_i^2)/dshape.
    shape_bar, dshape_bar, multiplier = cotangents
    return shape_bar * multiplier, dshape_bar * multiplier


_tap.defvjp(_tap_fwd, _tap_bwd)


@jax.custom_vjp
def _emit(loss: Array, channel: Array) -> Array:
    del channel
    return loss


def _emit_fwd(loss, channel):
    del channel
    return loss, loss


def _emit_bwd(loss, loss_bar):
    return loss_bar, 2.0 * loss


_emit.defvjp(_emit_fwd, _emit_bwd)


def emit_variance_gradient(loss: Array, channel: Array) -> Array:
    """Identity on the per-example diffusion loss; sends 2 * loss back to the schedule's shape.

    Args:
      loss: the per-example diffusion loss L_i, ``[B]`` (any units; nats usually).
      channel: the third output of :func:`gamma_with_variance_gradient`, ``[B]``.

    Returns:
      ``loss`` unchanged. In the backward pass ``loss`` receives its ordinary cotangent and the
      channel carries 2 L_i to the shape, turning its gradient into that of L_i^2.
    """
    if jnp.shape(channel) != jnp.shape(loss):
        raise UserError(
            "the variance gradient needs one time per example: loss has shape "
            f"{jnp.shape(loss)}, the schedule channel {jnp.shape(channel)}"
        )
    return _emit(loss, channel)


def gamma_with_variance_gradient(schedule: nn.Module, t: Array) -> tuple[Array, Array, Array]:
    """gamma(t), gamma'(t) and a channel for the paper's variance-minimising shape gradient.

    Use inside a Linen ``apply`` (a bound schedule) with one time per example, and pass the
    per-example diffusion loss through :func:`emit_variance_gradient` with the returned channel
    (see the module docstring). Values are identical to ``gamma_and_derivative(schedule, t)``;
    only the gradients that reach the schedule's shape parameters change.

    Args:
      schedule: a bound schedule module (``start_and_span()`` and ``shape(t)``).
      t: times, ``[B]`` float32.

    Returns:
      ``(gamma, dgamma_dt, channel)``, each ``[B]``, float32.
    """
    gamma_0, span = schedule.start_and_span()
    t = jnp.asarray(t, jnp.float32)
    shape, dshape = jax.jvp(schedule.shape, (t,), (jnp.ones_like(t),))
    shape, dshape, channel = _tap(shape, dshape)
    return _compose(gamma_0, span, shape), span * dshape, channel
