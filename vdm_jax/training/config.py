"""Experiment configs: what each field may hold, the check, and the model and optimizer built
from a checked config.

The fields, their types and their defaults are those of :func:`vdm_jax.configs.base.get_config`
(the one list); :data:`RULES` adds the range or the choices of the fields that have one.
:func:`check_config` is the only validation: the trainer calls it before it touches any
file, and builders here trust a checked config.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import numbers
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdm_jax.configs import base
from vdm_jax.errors import UserError
from vdm_jax.maths import diffusion, weightings
from vdm_jax.models.attention import ATTENTION_KINDS
from vdm_jax.models.unet import ScoreUNet
from vdm_jax.models.vdm import SCHEDULES, VDM, make_schedule
from vdm_jax.training import parallel, sources, steps

__all__ = [
    "RULES",
    "build_model",
    "build_optimizer",
    "build_weighting",
    "check_config",
    "field_defaults",
    "field_names",
    "flatten",
    "for_trained_run",
    "noise_bins",
    "resume_keys",
    "with_defaults",
]


def _choice(*options: str) -> tuple:
    return (lambda v: v in options, "one of " + ", ".join(map(repr, options)))


_POSITIVE = (lambda v: v >= 1, "a positive integer")
_NON_NEGATIVE_INT = (lambda v: v >= 0, "a non-negative integer")
_NON_NEGATIVE = (lambda v: v >= 0, "a non-negative finite number")
_UNIT = (lambda v: 0 <= v < 1, "a number in [0, 1)")
_ALL_OR_POSITIVE = (lambda v: v == -1 or v >= 1, "-1 (all, or the rest) or a positive integer")

#: Dotted field name -> (check, what the value must be), for fields whose type alone (taken
#: from the base config) does not say what they may hold.
RULES: dict[str, tuple] = {
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "data.name": _choice(*sources.KNOWN_DATASETS),
    "model.n_layer": _POSITIVE,
    "model.n_embd": _POSITIVE,
    "model.dropout_rate": _UNIT,
    "model.norm_groups": _POSITIVE,
    "model.norm_min_group_size": _POSITIVE,
    "model.num_classes": _NON_NEGATIVE_INT,
    "model.dtype": _choice("float32", "bfloat16"),
    "model.schedule": _choice(*SCHEDULES),
    "model.schedule_features": _POSITIVE,
    "model.timesteps": _NON_NEGATIVE_INT,
    "model.attention": _choice(*ATTENTION_KINDS),
    "model.batch_pieces": _POSITIVE,
    "model.reconstruction_window": _NON_NEGATIVE_INT,
    "model.parameterization": _choice(*diffusion.PARAMETERIZATIONS),
    "objective.weighting": _choice(*weightings.WEIGHTINGS),
    "objective.sigma_data": (lambda v: v > 0, "a positive number"),
    "objective.p_std": (lambda v: v > 0, "a positive number"),
    "objective.snr_gamma": (lambda v: v > 0, "a positive number"),
    "objective.noise_levels": _choice("schedule", "adaptive"),
    "objective.noise_bins": _POSITIVE,
    "objective.noise_floor": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "objective.noise_ema_decay": _UNIT,
    "optimizer.learning_rate": _NON_NEGATIVE,
    "optimizer.b1": _UNIT,
    "optimizer.b2": _UNIT,
    "optimizer.eps": _NON_NEGATIVE,
    "optimizer.weight_decay": _NON_NEGATIVE,
    "optimizer.warmup_steps": _NON_NEGATIVE_INT,
    "optimizer.decay_steps": _NON_NEGATIVE_INT,
    "optimizer.end_learning_rate_factor": _NON_NEGATIVE,
    "optimizer.clip_norm": _NON_NEGATIVE,
    "optimizer.ema_decay": _UNIT,
    "training.batch_size": _POSITIVE,
    "training.num_train_steps": _POSITIVE,
    "training.log_every": _POSITIVE,
    "training.eval_every": _NON_NEGATIVE_INT,
    "training.checkpoint_every": _POSITIVE,
    "training.keep_checkpoints": _POSITIVE,
    "training.steps_per_dispatch": _POSITIVE,
    "training.sample_every": _NON_NEGATIVE_INT,
    "training.skip_nonfinite_updates": _NON_NEGATIVE_INT,
    "parallel.mode": _choice(*parallel.MODES),
    "parallel.num_devices": _ALL_OR_POSITIVE,
    "parallel.data": _ALL_OR_POSITIVE,
    "parallel.fsdp": _ALL_OR_POSITIVE,
    "parallel.fsdp_min_size": _POSITIVE,
    "eval.batch_size": _POSITIVE,
    "eval.discrete_timesteps": _NON_NEGATIVE_INT,
    "sampling.num_samples": _POSITIVE,
    "sampling.sampler": _choice("ancestral", "ddim", "ode"),
    "sampling.sampling_steps": _POSITIVE,
    "sampling.decode": _choice("argmax", "sample"),
}

#: Model fields that may change when a run resumes: they change neither the parameters nor
#: (for a learned schedule) the function (gamma_min/max only initialise it), or choose only
#: how the same function is computed. Every other model field, and the fields below that fix
#: the data order, must agree with the checkpoint.
_FREE_ON_RESUME = {
    "model.dropout_rate", "model.dtype", "model.gamma_min", "model.gamma_max",
    "model.timesteps", "model.antithetic_time_sampling", "model.variance_gradient",
    "model.attention", "model.batch_pieces", "model.reconstruction_window", "model.remat",
}  # fmt: skip


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict (``config.to_dict()``) as ``{'section.field': value}``."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


@functools.cache
def _base_fields() -> tuple[dict[str, Any], dict[str, type]]:
    """(defaults, types) of every field of the base config, by dotted name."""
    config = base.get_config()
    types = {}

    def walk(section: ml_collections.ConfigDict, prefix: str) -> None:
        for name in section.keys():
            value = section[name]
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{name}.")
            else:
                field = section._fields[name]  # a placeholder knows its type while still None
                kind = field.get_type() if hasattr(field, "get_type") else type(value)
                types[f"{prefix}{name}"] = kind

    walk(config, "")
    return flatten(config.to_dict()), types


def field_defaults() -> dict[str, Any]:
    """Every known config field, dotted, with the base config's default, in its order."""
    return _base_fields()[0]


def field_names() -> list[str]:
    """Every known config field, dotted, in the base config's order."""
    return list(field_defaults())


def resume_keys() -> tuple[str, ...]:
    """Fields a checkpoint must agree on to be resumed: the data order (seed, data set, batch
    size), gradient clipping, and the model fields other than those free on resume."""
    model = [n for n in field_names() if n.startswith("model.") and n not in _FREE_ON_RESUME]
    noise = ("objective.noise_levels", "objective.noise_bins")  # the histogram in the state
    return ("seed", "data.name", "training.batch_size", "optimizer.clip_norm", *model, *noise)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _type_ok(value: Any, kind: type) -> tuple[bool, str]:
    """Whether ``value`` has the base config's type ``kind``, and how to say that type."""
    if kind is bool:
        return isinstance(value, bool | np.bool_), "True or False"
    if kind is int:
        return _is_int(value), "an integer"
    if kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return ok and math.isfinite(value), "a finite number"
    if kind is str:
        return value is None or (isinstance(value, str) and bool(value)), "a non-empty string"
    if kind in (tuple, list):
        ok = isinstance(value, tuple | list) and all(_is_int(v) for v in value)
        return ok, "a tuple of integers"
    raise AssertionError(f"no type check for {kind}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks every field of an experiment config; touches no file and no device.

    Raises:
      UserError: the first problem found, naming the field and the value: a value of the
        wrong type or out of range (see :data:`RULES`), an unknown field (with the closest
        known name) or a missing one, ``model.gamma_min >= model.gamma_max``,
        ``model.variance_gradient`` with ``model.timesteps > 0``, or ``data.name='folder'``
        without ``data.data_dir``.
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"config must be an ml_collections.ConfigDict, got {type(config).__name__}")
    defaults, types = _base_fields()
    flat = flatten(config.to_dict())
    for name in flat:
        if name not in defaults:
            close = difflib.get_close_matches(name, list(defaults), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(f"unknown config field {name} (= {flat[name]!r}){hint}")
    for name, kind in types.items():
        if name not in flat:
            raise UserError(
                f"config field {name} is missing (the base config has {defaults[name]!r})"
            )
        value = flat[name]
        ok, expected = _type_ok(value, kind)
        if ok and value is not None and name in RULES:
            check, expected = RULES[name]
            ok = check(value)
        if not ok:
            raise UserError(f"{name} must be {expected}, got {value!r}")
    m = config.model
    if not m.gamma_min < m.gamma_max:
        raise UserError(
            "model.gamma_min must be below model.gamma_max, got "
            f"gamma_min={m.gamma_min}, gamma_max={m.gamma_max}"
        )
    if m.variance_gradient and m.timesteps:
        raise UserError(
            "model.variance_gradient=True needs the continuous-time loss (model.timesteps=0), "
            f"got model.timesteps={m.timesteps}"
        )
    o = config.objective
    if m.timesteps and (o.weighting != "elbo" or o.noise_levels != "schedule"):
        raise UserError(
            f"objective.weighting={o.weighting!r} with objective.noise_levels="
            f"{o.noise_levels!r} needs the continuous-time loss (model.timesteps=0), got "
            f"model.timesteps={m.timesteps}; use weighting='elbo', noise_levels='schedule'"
        )
    if o.noise_levels == "adaptive" and m.variance_gradient:
        raise UserError(
            "objective.noise_levels='adaptive' draws the noise levels without the schedule's "
            "shape, so model.variance_gradient=True has nothing to train; set it to False"
        )
    if config.data.name == "folder" and config.data.data_dir is None:
        raise UserError(
            "data.data_dir must name the image folder (root/{train,test}/<class>/*.png) when "
            "data.name='folder'"
        )


def with_defaults(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config from a saved dict (a run's ``config.json``): the base config updated with the
    saved values, so that fields added since the run was written take their defaults.
    Unknown saved fields are kept (and refused by :func:`check_config`)."""
    config = base.get_config()
    with config.unlocked():
        config.update(ml_collections.ConfigDict(saved))
    return config


def for_trained_run(
    config: ml_collections.ConfigDict, saved: dict[str, Any], explicit: Any = ()
) -> ml_collections.ConfigDict:
    """``config`` made fit to evaluate, sample or report on a trained run: the fields that fix
    the run's checkpoint (:func:`resume_keys`: the model's, the data set, the seed, the batch
    size, clipping) as the run has them, the rest (the evaluation split and settings, sampling,
    devices, the data's folder) as ``config`` has them.

    Args:
      config: the config given for this command.
      saved: the run's own config (its ``config.json``, a nested dict).
      explicit: the dotted names of the fields set on the command line.

    Raises:
      UserError: a field of ``explicit`` that disagrees with the run, named with both values.
    """
    run = with_defaults(saved)
    out = config.copy_and_resolve_references()
    for key in resume_keys():
        *sections, name = key.split(".")
        given, kept = out, run
        for section in sections:
            given, kept = given[section], kept[section]
        if _same(given[name], kept[name]):
            continue
        if key in explicit:
            raise UserError(
                f"--config.{key}={given[name]!r} disagrees with the trained run, which has "
                f"{key}={kept[name]!r}: the run's checkpoint fixes it; drop the flag"
            )
        with given.unlocked():
            given[name] = kept[name]
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values (a tuple equals a list)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> VDM:
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
    that weighting takes."""
    o = config.objective
    values = {"bias": o.bias, "sigma_data": o.sigma_data, "p_mean": o.p_mean,
              "p_std": o.p_std, "gamma": o.snr_gamma}  # fmt: skip
    taken = {"sigmoid": ("bias",), "edm": ("sigma_data", "p_mean", "p_std"),
             "edm_monotonic": ("sigma_data", "p_mean", "p_std"), "min_snr": ("gamma",)}  # fmt: skip
    return weightings.get_weighting(
        o.weighting, **{k: values[k] for k in taken.get(o.weighting, ())}
    )


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
