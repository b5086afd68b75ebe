"""What a checked experiment config builds: the model, its weighting of the loss, the
optimizer, and the size of the adaptive noise-level histogram. The config is checked first
(:func:`vdm_jax.training.schema.check_config`); these trust it.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import ml_collections
import optax

from vdm_jax.maths import weightings
from vdm_jax.models.unet import ScoreUNet
from vdm_jax.models.vdm import VDM, make_schedule
from vdm_jax.training import steps

__all__ = ["build_optimizer", "build_weighting", "model_from_config", "noise_bins"]


def model_from_config(config: ml_collections.ConfigDict, vocab_size: int) -> VDM:
    """The :class:`~vdm_jax.models.vdm.VDM` a checked config describes, for data with
    ``vocab_size`` values."""
    m = config.model
    net = ScoreUNet(
        n_layer=m.n_layer,
        n_embd=m.n_embd,
        gamma_min=m.gamma_min,
        gamma_max=m.gamma_max,
        dropout_rate=m.dropout_rate,
        attention_everywhere=m.attention_everywhere,
        with_fourier_features=m.with_fourier_features,
        fourier_exponents=tuple(m.fourier_exponents),
        norm_groups=m.norm_groups,
        norm_min_group_size=m.norm_min_group_size,
        conditioning_input=m.conditioning_input,
        num_classes=m.num_classes,
        dtype=jnp.dtype(m.dtype),
        attention=m.attention,
        batch_pieces=m.batch_pieces,
        remat=m.remat,
    )
    return VDM(
        score_net=net,
        schedule=make_schedule(m.schedule, m.gamma_min, m.gamma_max, m.schedule_features),
        vocab_size=vocab_size,
        num_steps=m.timesteps,
        antithetic_time_sampling=m.antithetic_time_sampling,
        variance_gradient=m.variance_gradient,
        reconstruction_window=m.reconstruction_window,
        parameterization=m.parameterization,
        weighting=build_weighting(config),
    )


def build_weighting(config: ml_collections.ConfigDict) -> weightings.Weighting:
    """The :class:`~vdm_jax.maths.weightings.Weighting` of ``config.objective``, with the parameters
    that weighting takes (``objective.bias``, ``sigma_data``, ``p_mean``, ``p_std``, and
    ``snr_gamma`` as ``gamma``)."""
    o = config.objective
    values = {"bias": o.bias, "sigma_data": o.sigma_data, "p_mean": o.p_mean,
              "p_std": o.p_std, "gamma": o.snr_gamma}  # fmt: skip
    # Each weighting (a registered one too) takes the config's values of the parameters its
    # factory names; a parameter with no config field keeps its default.
    taken = inspect.signature(weightings.WEIGHTINGS[o.weighting][0]).parameters
    return weightings.get_weighting(o.weighting, **{k: values[k] for k in taken if k in values})


def noise_bins(config: ml_collections.ConfigDict) -> int:
    """Bins of the adaptive noise-level histogram in the train state; 0 for uniform t."""
    o = config.objective
    return o.noise_bins if o.noise_levels == "adaptive" else 0


def build_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, learning-rate schedule) from a checked ``config.optimizer``."""
    o = config.optimizer
    schedule = steps.learning_rate_schedule(
        o.learning_rate, o.warmup_steps, o.decay_steps, o.end_learning_rate_factor
    )
    optimizer = steps.make_optimizer(
        learning_rate=o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
        weight_decay=o.weight_decay, warmup_steps=o.warmup_steps, decay_steps=o.decay_steps,
        end_learning_rate_factor=o.end_learning_rate_factor, clip_norm=o.clip_norm,
    )  # fmt: skip
    return optimizer, schedule
