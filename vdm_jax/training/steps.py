"""Training state, optimizer and the pure train and eval steps.

The steps are pure functions of (state, batch, key): no config objects, no I/O, nothing that
cannot run under ``jax.jit`` with shardings or under ``jax.pmap`` (see
:mod:`vdm_jax.training.parallel`, which compiles them).

Randomness: one loop key, folded with the step and then with the index of each data shard
(``fold_in(fold_in(key, step), shard)``), never split on the host. A training batch is viewed
as ``num_shards`` equal shards that draw their times and noise from their own keys, so the
jit mode (all shards in one program) and the pmap mode (one shard per device) see the same
random numbers and give the same losses. Evaluation draws from one key per batch, whatever
the devices (:func:`eval_terms`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vdm_jax.errors import UserError
from vdm_jax.maths import losses, weightings
from vdm_jax.models import evaluation
from vdm_jax.models.mulan import MuLAN, MuLANTerms
from vdm_jax.models.vdm import VLBTerms

__all__ = [
    "TrainState",
    "eval_terms",
    "init_state",
    "learning_rate_schedule",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "param_shapes",
    "state_from_params",
    "train_step",
    "weight_decay_mask",
]

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step.

    Attributes:
      step: int32 scalar, the number of updates applied so far.
      params: the model's parameters (the 'params' collection).
      ema_params: exponential moving average of ``params``, used for evaluation and sampling.
      opt_state: the optax optimizer state.
      noise_histogram: with adaptive noise levels, the EMA of E[w(lambda) ||eps - eps_hat||^2]
        over equal bins of [gamma(0), gamma(1)], float32 ``[K]`` (the same on every device,
        checkpointed with the rest); None otherwise.
    """

    step: Array
    params: PyTree
    ema_params: PyTree
    opt_state: PyTree
    noise_histogram: Array | None = None


def weight_decay_mask(params: PyTree) -> PyTree:
    """True for the parameters weight decay applies to: kernels and embeddings (ndim >= 2)
    outside the noise schedule; biases, norm scales and the schedule are left alone."""

    def decays(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        return leaf.ndim >= 2 and "schedule" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    *,
    learning_rate: float = 2e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    warmup_steps: int = 0,
    decay_steps: int = 0,
    end_learning_rate_factor: float = 0.0,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """AdamW with a linear warm-up, an optional cosine decay and optional gradient clipping.

    Args:
      learning_rate: peak learning rate.
      b1, b2, eps: Adam's moment decays and epsilon (the paper: b2 = 0.99).
      weight_decay: decoupled weight decay, on the parameters :func:`weight_decay_mask` picks.
      warmup_steps: linear warm-up from 0 over this many steps (0: none).
      decay_steps: cosine decay to ``end_learning_rate_factor * learning_rate`` over this many
        steps after the warm-up (0: constant after the warm-up).
      end_learning_rate_factor: the final fraction of the peak learning rate of the decay.
      clip_norm: clip the gradient's global norm to this value (None or 0: no clipping).

    Returns:
      An optax transformation; its schedule is also exposed as :func:`learning_rate_schedule`.
    """
    for name, value in (("learning_rate", learning_rate), ("warmup_steps", warmup_steps),
                        ("decay_steps", decay_steps), ("weight_decay", weight_decay)):  # fmt: skip
        if value < 0:
            raise UserError(f"optimizer {name} must be non-negative, got {value}")
    schedule = learning_rate_schedule(
        learning_rate, warmup_steps, decay_steps, end_learning_rate_factor
    )
    adamw = optax.adamw(
        schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask
    )
    if clip_norm:
        return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    return adamw


def learning_rate_schedule(
    learning_rate: float, warmup_steps: int, decay_steps: int, end_factor: float = 0.0
) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then constant or a cosine decay."""
    after = (
        optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_factor)
        if decay_steps
        else optax.constant_schedule(learning_rate)
    )
    if not warmup_steps:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def init_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    key: Array,
    example_images: Array,
    example_labels: Array | None = None,
    noise_bins: int = 0,
) -> TrainState:
    """A fresh :class:`TrainState`: parameters from ``key``, EMA equal to them, step 0.

    Args:
      model: the :class:`~vdm_jax.models.vdm.VDM` or :class:`~vdm_jax.models.mulan.MuLAN`.
      optimizer: from :func:`make_optimizer`.
      key: PRNG key.
      example_images: integer ``[b, H, W, C]`` giving the shapes (values unused).
      example_labels: ``[b]`` int labels for a class-conditional model, else None.
      noise_bins: K > 0 for adaptive noise levels: a histogram of K equal bins, starting
        uniform; 0 for the schedule's uniform t.
    """
    params = _init_params(model, key, example_images, example_labels)
    return state_from_params(params, optimizer, noise_bins)


def _init_params(
    model: nn.Module, key: Array, example_images: Array, example_labels: Array | None
) -> PyTree:
    """``model``'s new parameters from ``key`` (its 'params' and 'diffusion' streams)."""
    k_params, k_diffusion = jax.random.split(key)
    variables = model.init(
        {"params": k_params, "diffusion": k_diffusion}, example_images, example_labels, train=False
    )
    return variables["params"]


def state_from_params(
    params: PyTree, optimizer: optax.GradientTransformation, noise_bins: int = 0
) -> TrainState:
    """The :class:`TrainState` at step 0 of ``params``: EMA equal to them, the optimizer's
    initial state, a uniform noise-level histogram of ``noise_bins`` bins (none for 0)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        # A copy, not the same buffers: the train step donates the whole state.
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        noise_histogram=jnp.ones((noise_bins,), jnp.float32) if noise_bins else None,
    )


def param_shapes(
    model: nn.Module, image_shape: tuple[int, ...], with_labels: bool = False
) -> PyTree:
    """The shapes and dtypes of ``model``'s parameters (a tree of ``jax.ShapeDtypeStruct``)
    for images of ``image_shape`` ``(H, W, C)``, with class labels or not.

    Traced once per model definition in a process: equal models (the same fields, as two
    builds of one config give) share the result, so that restoring a run again does not
    trace its network again."""
    image_shape = tuple(int(n) for n in image_shape)
    try:
        hash(model)
    except TypeError:  # a field without a hash: nothing to share the result by
        return _param_shapes(model, image_shape, with_labels)
    return _cached_param_shapes(model, image_shape, with_labels)


def _param_shapes(model: nn.Module, image_shape: tuple[int, ...], with_labels: bool) -> PyTree:
    example = jnp.zeros((1, *image_shape), jnp.uint8)
    labels = jnp.zeros((1,), jnp.int32) if with_labels else None
    # Only shapes are taken: the key's value does not matter.
    return jax.eval_shape(lambda: _init_params(model, jax.random.key(0), example, labels))


_cached_param_shapes = functools.lru_cache(maxsize=32)(_param_shapes)


def _shard_keys(key: Array, step: Array, first_shard: Array | int, num_shards: int) -> Array:
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first_shard + jnp.arange(num_shards))


def _sharded_terms(model, params, batch, keys, *, train: bool, **kwargs) -> Any:
    """The model's call on a batch split into len(keys) shards, shard i drawing from keys[i]:
    its :class:`VLBTerms` (with ``return_objective=True`` in ``kwargs``, the pair with its
    objective), each ``[B]``."""
    num_shards = keys.shape[0]

    def split(x):
        if x.shape[0] % num_shards:
            raise UserError(
                f"batch of {x.shape[0]} examples does not split into {num_shards} equal shards"
            )
        return x.reshape(num_shards, x.shape[0] // num_shards, *x.shape[1:])

    def one_shard(images, labels, conditioning, key):
        k_diffusion, k_dropout = jax.random.split(key)
        extra = {} if conditioning is None else {"conditioning": conditioning}
        return model.apply(
            {"params": params},
            images,
            labels,
            **extra,
            train=train,
            rngs={"diffusion": k_diffusion, "dropout": k_dropout},
            **kwargs,
        )

    images = split(batch["image"])
    labels = None if batch.get("label") is None else split(batch["label"])
    # The batch's float [B] "conditioning" (the augmentation flag) reaches a score network
    # that takes a scalar conditioning input; other networks never see it (MuLAN's network
    # is conditioned on its latent instead).
    takes_conditioning = not isinstance(model, MuLAN) and getattr(
        model.score_net, "conditioning_input", False
    )
    conditioning = batch.get("conditioning") if takes_conditioning else None
    conditioning = None if conditioning is None else split(conditioning.astype(jnp.float32))
    if num_shards == 1:  # the same computation without a batch axis of size 1
        first = None if labels is None else labels[0]
        return one_shard(
            images[0], first, None if conditioning is None else conditioning[0], keys[0]
        )
    terms = jax.vmap(one_shard)(images, labels, conditioning, keys)
    return jax.tree.map(lambda v: v.reshape(-1), terms)


def _metrics(terms: VLBTerms | MuLANTerms, num_dims: int) -> dict[str, Array]:
    to_bpd = 1.0 / (num_dims * jnp.log(2.0))
    metrics = {
        "bpd": jnp.mean(terms.bpd),
        "prior_bpd": jnp.mean(terms.prior) * to_bpd,
        "reconstruction_bpd": jnp.mean(terms.reconstruction) * to_bpd,
        "diffusion_bpd": jnp.mean(terms.diffusion) * to_bpd,
    }
    if isinstance(terms, MuLANTerms):
        metrics["latent_bpd"] = jnp.mean(terms.latent) * to_bpd
    return metrics


def train_step(
    state: TrainState,
    batch: dict[str, Array],
    key: Array,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    num_shards: int = 1,
    axis_name: str | None = None,
    learning_rate_fn: Callable[[Array], Array] | None = None,
    noise_floor: float = 0.1,
    noise_decay: float = 0.99,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update on a batch; pure.

    The gradient is that of the model's objective (the bound for the ELBO weighting; see
    :class:`~vdm_jax.models.vdm.VDM`'s ``weighting``; for a :class:`~vdm_jax.models.mulan.MuLAN`
    its bound, the latent's KL term included); the bound of the same forward pass is
    reported beside it. With ``state.noise_histogram`` the noise levels are drawn from it
    (adaptive noise levels) and its EMA is updated from this step's global batch.

    Args:
      state: the current :class:`TrainState`.
      batch: 'image' integer ``[B, H, W, C]``, optionally 'label' int ``[B]``.
      key: the run's loop key (the same every step; folded with ``state.step`` here).
      model: the :class:`~vdm_jax.models.vdm.VDM` or :class:`~vdm_jax.models.mulan.MuLAN`.
      optimizer: the optax transformation the state was made with.
      ema_decay: decay of the parameter EMA (0.9999 in the paper; 0 copies the parameters).
      num_shards: how many random-number shards ``batch`` holds (see the module docstring).
      axis_name: under ``pmap``, the device axis: the batch is then this device's shard and
        gradients and metrics are averaged over the axis.
      learning_rate_fn: the optimizer's schedule, to report the learning rate.
      noise_floor: the share of the uniform density mixed into the adaptive one, in (0, 1]
        (:func:`vdm_jax.maths.weightings.histogram_probs`).
      noise_decay: the EMA decay of the noise-level histogram, in [0, 1).

    Returns:
      ``(new_state, metrics)``; metrics are float32 scalars: 'loss' (the trained objective in
      bits/dim: the bound itself for the ELBO), 'bpd' (the bound), 'prior_bpd',
      'reconstruction_bpd', 'diffusion_bpd', 'gamma_0', 'gamma_1', 'grad_norm', 'lr'; for
      MuLAN also 'latent_bpd' (the latent's KL term, part of 'bpd'), and 'gamma_0', 'gamma_1'
      are its schedule's fixed endpoints, the same for every pixel.
    """
    first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * num_shards
    keys = _shard_keys(key, state.step, first, num_shards)
    num_dims = math.prod(batch["image"].shape[1:])

    histogram = state.noise_histogram
    probs = None if histogram is None else weightings.histogram_probs(histogram, noise_floor)

    def loss_fn(params):
        if isinstance(model, MuLAN):  # its objective is its bound, latent KL included
            terms = _sharded_terms(model, params, batch, keys, train=True)
            return jnp.mean(terms.bpd), (terms, None)
        terms, objective = _sharded_terms(
            model, params, batch, keys, train=True, noise_level_probs=probs, return_objective=True
        )
        return jnp.mean(losses.bits_per_dim(objective.objective, num_dims)), (terms, objective)

    (loss, (terms, objective)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss, **_metrics(terms, num_dims)}
    if histogram is not None:
        histogram = weightings.update_histogram(
            histogram, objective.noise_bins, objective.noise_values, noise_decay, axis_name
        )
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)

    gamma_0, gamma_1 = model.apply({"params": params}, method=model.endpoints)
    metrics.update(
        gamma_0=gamma_0,
        gamma_1=gamma_1,
        grad_norm=jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
        lr=jnp.asarray(learning_rate_fn(state.step) if learning_rate_fn else jnp.nan, jnp.float32),
    )
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        ema_params=ema_params,
        opt_state=opt_state,
        noise_histogram=histogram,
    )
    return new_state, metrics


def eval_terms(
    params: PyTree,
    batch: dict[str, Array],
    key: Array,
    *,
    model: nn.Module,
    num_steps: int | None = None,
) -> VLBTerms:
    """Per-example VLB terms of a batch without dropout; pure. The evaluation bound of
    :func:`vdm_jax.models.evaluation.bound_terms` on the 'params' collection, so that the training
    system evaluates exactly as :func:`vdm_jax.models.evaluation.evaluate_bpd` does.

    Args:
      params: parameters to evaluate (usually the EMA ones).
      batch: 'image' integer ``[B, H, W, C]``, optionally 'label' ``[B]``.
      key: this batch's key.
      model: the :class:`~vdm_jax.models.vdm.VDM` or :class:`~vdm_jax.models.mulan.MuLAN`.
      num_steps: T for the discrete-time bound, 0 continuous, None the model's own.

    Returns:
      :class:`~vdm_jax.models.vdm.VLBTerms` (MuLAN: :class:`~vdm_jax.models.mulan.MuLANTerms`,
      with the latent's KL term), each ``[B]``.
    """
    return evaluation.bound_terms(model, {"params": params}, batch, key, num_steps=num_steps)


def make_train_step(
    model, optimizer, ema_decay: float, learning_rate_fn=None, **noise_levels
) -> Callable:
    """:func:`train_step` with the model and optimizer bound;
    ``noise_levels`` are its ``noise_floor`` and ``noise_decay``."""
    return functools.partial(
        train_step,
        model=model,
        optimizer=optimizer,
        ema_decay=ema_decay,
        learning_rate_fn=learning_rate_fn,
        **noise_levels,
    )


def make_eval_step(model, num_steps: int | None = None) -> Callable:
    """:func:`eval_terms` with the model bound, ready to compile."""
    return functools.partial(eval_terms, model=model, num_steps=num_steps)
