"""The one config schema: every field of an experiment config, and its check.

:data:`FIELDS` is a table of :class:`Field` rows, one per dotted field name
(``'training.batch_size'``): its default (the paper's CIFAR-10 settings), type, rule (range or
choices), meaning, and whether a run's checkpoint fixes it. Everything else reads the table:
:func:`base_config` (the base config, ``vdm_jax/configs/base.py``), :func:`check_config` (the
only validation: the trainer calls it before it touches any file, and builders trust a checked
config), ``--mode=show_config`` (:func:`field_meanings`), the command line's suggestions for a
mistyped field (:func:`field_defaults`) and the checks of a resumed or evaluated run
(:func:`resume_keys`, :func:`for_trained_run`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

from vdm_jax.errors import UserError
from vdm_jax.maths import diffusion, weightings
from vdm_jax.models.attention import ATTENTION_KINDS
from vdm_jax.models.likelihood import ESTIMATORS
from vdm_jax.models.mulan import LATENT_KINDS
from vdm_jax.models.vdm import SCHEDULES
from vdm_jax.training import builders, parallel, sources

__all__ = [
    "FIELDS",
    "Field",
    "Rule",
    "base_config",
    "check_config",
    "field",
    "field_defaults",
    "field_meanings",
    "field_names",
    "flatten",
    "for_trained_run",
    "resume_keys",
    "with_defaults",
]


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field's value may be beyond its type.

    Attributes:
      test: True for an allowed value (of the field's type); unused when ``names`` is given.
      words: the allowed values in words, for error messages (``'a positive integer'``).
      names: for a field whose values are names, returns the allowed names; called each time
        a config is checked or listed, so that a registry's current names count (a schedule,
        weighting or data set registered after import).
    """

    test: Callable[[Any], bool] | None = None
    words: str = ""
    names: Callable[[], tuple[str, ...]] | None = None

    def check(self, value: Any) -> bool:
        """True for an allowed value (of the field's type)."""
        if self.names is not None or self.test is None:
            return value in self.choices
        return bool(self.test(value))

    @property
    def choices(self) -> tuple[str, ...]:
        """The allowed names now, or ``()`` for a rule that is not a list of names."""
        return tuple(self.names()) if self.names is not None else ()

    @property
    def expected(self) -> str:
        """The allowed values in words."""
        return "one of " + ", ".join(map(repr, self.choices)) if self.names else self.words


def _choice(*options: str) -> Rule:
    return Rule(names=lambda: options)


def _registered(names: Callable[[], Any]) -> Rule:
    return Rule(names=lambda: tuple(names()))


_POSITIVE = Rule(lambda v: v >= 1, "a positive integer")
_NON_NEGATIVE_INT = Rule(lambda v: v >= 0, "a non-negative integer")
_NON_NEGATIVE = Rule(lambda v: v >= 0, "a non-negative finite number")
_POSITIVE_REAL = Rule(lambda v: v > 0, "a positive number")
_UNIT = Rule(lambda v: 0 <= v < 1, "a number in [0, 1)")
_ALL_OR_POSITIVE = Rule(lambda v: v == -1 or v >= 1, "-1 (all, or the rest) or a positive integer")


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field.

    Attributes:
      name: dotted, ``'section.field'`` (or ``'seed'`` at the top).
      default: the base config's value; None for a field with no value until set.
      type: bool, int, float, str or tuple (of integers); a None default needs it given.
      rule: range or choices beyond the type, or None.
      meaning: what the field does, one plain-text line; for a field with choices the
        choices are listed first (see :attr:`description`).
      fixed_by_checkpoint: whether a run's checkpoint fixes the field: a resumed, evaluated or
        sampled run must keep the run's value (the model's parameters and function, and the
        data order).
    """

    name: str
    default: Any
    meaning: str
    rule: Rule | None = None
    fixed_by_checkpoint: bool = False
    type: type = None  # type: ignore[assignment]  # from the default when not given

    def __post_init__(self):
        if self.type is None:
            if self.default is None:
                raise AssertionError(f"{self.name}: a field without a default needs its type")
            object.__setattr__(self, "type", type(self.default))

    @property
    def description(self) -> str:
        """The meaning, after ``a | b | c:`` listing every choice for a field with choices (so
        that the listing cannot drift from what :func:`check_config` accepts)."""
        if self.rule is None or not self.rule.choices:
            return self.meaning
        return " | ".join(self.rule.choices) + ": " + self.meaning


def _f(name, default, meaning, rule=None, *, fixed=False, kind=None) -> Field:
    return Field(name, default, meaning, rule, fixed, kind)


# Fixed by a checkpoint: the data order (seed, data set, batch size), clipping (optimizer
# state), and the model fields that change its parameters or function. Model fields free on
# resume change neither (gamma_min/max only initialise a learned schedule) or choose only how
# the same function is computed.
#: Every field of an experiment config, in the base config's order.
FIELDS: tuple[Field, ...] = (
    _f("seed", 0, "seeds the parameters, the data order and every random draw of the run",
       Rule(lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"), fixed=True),
    _f("data.name", "cifar10", "the data set (folder: data.data_dir/{train,test}/<class>/*.png)",
       _registered(sources.dataset_names), fixed=True),
    _f("data.data_dir", None, "tfds data_dir, or the root of an image folder (name='folder')",
       kind=str),
    _f("data.augment", False,
       'the paper\'s flips and 90-degree rotations, flagged in the batch as "conditioning"'),
    _f("model.network", "unet", "the score network (unet: ScoreUNet, which the model fields "
       "below configure; others: vdm_jax.training.builders.register_network)",
       _registered(builders.NETWORKS.keys), fixed=True),
    _f("model.n_layer", 32, "ResNet blocks of the score network (one resolution)", _POSITIVE,
       fixed=True),
    _f("model.n_embd", 128, "channels of the score network", _POSITIVE, fixed=True),
    _f("model.dropout_rate", 0.1, "dropout in the ResNet blocks while training", _UNIT),
    _f("model.attention_everywhere", False, "self-attention after every block, not only mid",
       fixed=True),
    _f("model.with_fourier_features", True, "concatenate Fourier features of z_t (appendix C)",
       fixed=True),
    _f("model.fourier_exponents", (6, 7), "their frequencies 2**n * 2 pi, n in this tuple",
       fixed=True),
    _f("model.norm_groups", 32, "GroupNorm groups (fewer when the channels do not split)",
       _POSITIVE, fixed=True),
    _f("model.norm_min_group_size", 4, "fewest channels per GroupNorm group (1: exact groups)",
       _POSITIVE, fixed=True),
    _f("model.conditioning_input", False, 'concatenate the batch\'s float flag "conditioning" '
       "(augmented or not) to the time embedding", fixed=True),
    _f("model.num_classes", 0, "> 0: class-conditional (label num_classes = unconditional)",
       _NON_NEGATIVE_INT, fixed=True),
    _f("model.dtype", "float32", "activations (parameters stay float32)",
       _choice("float32", "bfloat16")),
    _f("model.schedule", "learned_linear", "the noise schedule gamma(t) (monotonic_unnormalised: "
       "the original code's network, endpoints not pinned)", _registered(SCHEDULES.keys),
       fixed=True),
    _f("model.gamma_min", -13.3, "gamma(0) = -log SNR at t = 0 (initial value if learned)"),
    _f("model.gamma_max", 5.0, "gamma(1) = -log SNR at t = 1 (initial value if learned)"),
    _f("model.schedule_features", 1024, "width of the monotonic schedule's network", _POSITIVE,
       fixed=True),
    _f("model.timesteps", 0, "T of the bound: 0 is continuous time, T > 0 discrete times i/T",
       _NON_NEGATIVE_INT),
    _f("model.antithetic_time_sampling", True, "a batch's times (u + i/B) mod 1"),
    _f("model.variance_gradient", False, "train the schedule's shape (appendix I.2); T = 0"),
    _f("model.attention", "dot_product", "how attention is computed (dot_product: "
       "jax.nn.dot_product_attention, cuDNN flash attention on GPUs; chunked: fastest on CPUs)",
       _choice(*ATTENTION_KINDS)),
    _f("model.batch_pieces", 1, "run the network on the batch in N pieces (2: 2-core CPUs)",
       _POSITIVE),
    _f("model.reconstruction_window", 0,
       "> 0: windowed decoder normaliser (4: CPUs), same value", _NON_NEGATIVE_INT),
    _f("model.remat", False, "recompute each block in the backward pass (less memory)"),
    _f("model.parameterization", "eps", "what the score network predicts",
       _choice(*diffusion.PARAMETERIZATIONS), fixed=True),
    # What training minimises (Kingma & Gao 2023). Evaluation is always the bound (w = 1).
    _f("objective.weighting", "elbo", "the weighting w(lambda) training minimises "
       "(vdm_jax.maths.weightings); evaluation is always the bound",
       _registered(weightings.WEIGHTINGS.keys)),
    _f("objective.bias", 0.0, "sigmoid: w = sigmoid(bias - lambda)"),
    _f("objective.sigma_data", 0.5, "edm, edm_monotonic", _POSITIVE_REAL),
    _f("objective.p_mean", -1.2, "edm, edm_monotonic: mean of log sigma"),
    _f("objective.p_std", 1.2, "edm, edm_monotonic: std of log sigma", _POSITIVE_REAL),
    _f("objective.snr_gamma", 5.0, "min_snr: min(SNR, snr_gamma) / SNR", _POSITIVE_REAL),
    _f("objective.noise_levels", "schedule", "how training draws noise levels (schedule: the "
       "schedule's uniform t; adaptive: a learned histogram over lambda, T = 0)",
       _choice("schedule", "adaptive"), fixed=True),
    _f("objective.noise_bins", 100, "adaptive: equal bins of [gamma(0), gamma(1)]", _POSITIVE,
       fixed=True),
    _f("objective.noise_floor", 0.1, "adaptive: share of the uniform density mixed in",
       Rule(lambda v: 0 < v <= 1, "a number in (0, 1]")),
    _f("objective.noise_ema_decay", 0.99, "adaptive: EMA decay of the histogram", _UNIT),
    _f("optimizer.learning_rate", 2e-4, "AdamW's peak learning rate", _NON_NEGATIVE),
    _f("optimizer.b1", 0.9, "Adam's first-moment decay", _UNIT),
    _f("optimizer.b2", 0.99, "Adam's second-moment decay", _UNIT),
    _f("optimizer.eps", 1e-8, "Adam's epsilon", _NON_NEGATIVE),
    _f("optimizer.weight_decay", 0.01, "decoupled weight decay of kernels and embeddings",
       _NON_NEGATIVE),
    _f("optimizer.warmup_steps", 100, "linear warm-up of the learning rate over these steps",
       _NON_NEGATIVE_INT),
    _f("optimizer.decay_steps", 0, "> 0: cosine decay over this many steps after warm-up",
       _NON_NEGATIVE_INT),
    _f("optimizer.end_learning_rate_factor", 0.0, "the decay ends at this x learning_rate",
       _NON_NEGATIVE),
    _f("optimizer.clip_norm", 0.0, "> 0: clip the global gradient norm to this value",
       _NON_NEGATIVE, fixed=True),
    _f("optimizer.ema_decay", 0.9999, "decay of the parameters' moving average (eval, samples)",
       _UNIT),
    _f("training.batch_size", 128, "global, over all devices and hosts", _POSITIVE, fixed=True),
    _f("training.num_train_steps", 10_000_000, "optimizer updates of the whole run", _POSITIVE),
    _f("training.log_every", 100, "steps between metric lines (metrics.jsonl, TensorBoard)",
       _POSITIVE),
    _f("training.eval_every", 10_000, "steps between evaluations (0: only at the end)",
       _NON_NEGATIVE_INT),
    _f("training.checkpoint_every", 5_000, "steps between checkpoints", _POSITIVE),
    _f("training.keep_checkpoints", 3, "the newest checkpoints kept on disk", _POSITIVE),
    _f("training.steps_per_dispatch", 1, "> 1: lax.scan over several steps per call", _POSITIVE),
    _f("training.sample_every", 50_000, "steps between PNG grids of samples (0: at the end)",
       _NON_NEGATIVE_INT),
    _f("training.skip_nonfinite_updates", 0, "a non-finite loss, gradient or parameter stops "
       "training (0), or N > 0: skip such updates (parameters unchanged, counted in the metric "
       "skipped_updates), stopping after N in a row", _NON_NEGATIVE_INT),
    _f("parallel.mode", "jit", "how the step runs on many devices (jit: a mesh and "
       "shardings; pmap: a replica per device)",
       _choice(*parallel.MODES)),
    _f("parallel.num_devices", -1, "devices to use; -1: all (over all processes)",
       _ALL_OR_POSITIVE),
    _f("parallel.data", -1, "the mesh: data x fsdp devices, one of them -1 (the rest). fsdp > 1 "
       "shards every parameter of at least fsdp_min_size elements (and its EMA and Adam "
       "moments) over the fsdp axis; 'jit' mode only", _ALL_OR_POSITIVE),
    _f("parallel.fsdp", 1, "devices each large parameter is sharded over (see data)",
       _ALL_OR_POSITIVE),
    _f("parallel.fsdp_min_size", 2**16, "smaller parameters stay replicated under fsdp",
       _POSITIVE),
    _f("eval.batch_size", 256, "global evaluation batch (the last one padded and masked)",
       _POSITIVE),
    _f("eval.split", "test", "the split of one exact evaluation pass: 'train' or 'test'; tfds "
       "data sets also take split expressions such as 'test[:1000]'"),
    _f("eval.discrete_timesteps", 0, "> 0: also the discrete-time bound at this T (e.g. 1000)",
       _NON_NEGATIVE_INT),
    # --mode=eval with any likelihood estimator (vdm_jax.training.evaluate).
    _f("eval.estimator", "vlb", "the likelihood estimator of --mode=eval (vlb: the run's own "
       "evaluation, one noise level per image; the others: vdm_jax.models.likelihood, resumable "
       "in WORKDIR/eval/)", _choice(*ESTIMATORS)),
    _f("eval.num_draws", 1, "K per image: noise levels (dense_vlb, discrete) or draws of z_0 "
       "(ode, ode_iw); vlb takes 1", _POSITIVE),
    _f("eval.num_examples", 0, "estimators but vlb: the first N examples of the split (0: all)",
       _NON_NEGATIVE_INT),
    _f("eval.ode_rtol", 1e-5, "ode, ode_iw: the ODE solve's relative tolerance", _POSITIVE_REAL),
    _f("eval.ode_atol", 1e-5, "ode, ode_iw: the ODE solve's absolute tolerance", _POSITIVE_REAL),
    _f("eval.num_probes", 1, "ode, ode_iw: Hutchinson probes per draw (each one more "
       "Jacobian-vector product per function evaluation); more lower the trace's noise",
       _POSITIVE),
    _f("eval.recompute", False, "estimators but vlb: compute again instead of reading the "
       "results of an earlier pass with the same settings (removes them)"),
    _f("sampling.num_samples", 64, "images in a grid of samples", _POSITIVE),
    _f("sampling.sampler", "ancestral", "how samples are drawn",
       _choice("ancestral", "ddim", "ode")),
    _f("sampling.sampling_steps", 1000, "denoising steps of ancestral and DDIM sampling",
       _POSITIVE),
    _f("sampling.decode", "argmax", "how z_0 becomes integer pixels",
       _choice("argmax", "sample")),
    # --mode=sample of many images into one .npz (vdm_jax.training.evaluate_samples).
    _f("sampling.num_images", 0, "> 0: --mode=sample writes this many images as one .npz "
       "(uint8 [N, H, W, C] 0..255, key arr_0) beside the grid, resumable", _NON_NEGATIVE_INT),
    _f("sampling.device_batch_size", 64, "num_images: images per device at a time (the "
       "images do not depend on the number of devices)", _POSITIVE),
    _f("sampling.recompute", False, "num_images: sample again instead of reading an earlier "
       ".npz with the same settings (removes it)"),
    # MuLAN (Sahoo et al. 2024): a learned schedule per pixel, conditioned on a latent c.
    _f("model.family", "vdm", "the model (vdm: one schedule gamma(t) for every pixel; mulan: "
       "MuLAN's per-pixel polynomial schedule gamma(t, c) of a latent c ~ q(c|x), its width "
       "model.schedule_features, the latent's KL in the bound; continuous time, eps or v, "
       "unconditional)", _choice("vdm", "mulan"), fixed=True),
    _f("model.latent_kind", "topk", "mulan: the latent c (topk: a relaxed k-hot with the "
       "authors' KL term, their estimate of the bound; gaussian: a diagonal Gaussian against "
       "N(0, I), a true bound)", _choice(*LATENT_KINDS), fixed=True),
    _f("model.latent_size", 50, "mulan: D, the size of the latent c", _POSITIVE, fixed=True),
    _f("model.latent_k", 15, "mulan, topk: entries set in the k-hot latent (at most "
       "latent_size)", _POSITIVE, fixed=True),
    _f("model.encoder_n_layer", 4, "mulan: ResNet blocks of the encoder q(c|x) before its "
       "middle", _NON_NEGATIVE_INT, fixed=True),
    _f("model.encoder_n_embd", 128, "mulan: channels of the encoder q(c|x)", _POSITIVE,
       fixed=True),
    _f("sampling.latent", "prior", "mulan: the samples' latent c (prior: c ~ p(c); "
       "deterministic: the authors' sampler's fixed embedding)",
       _choice("prior", "deterministic")),
)  # fmt: skip

_BY_NAME = {f.name: f for f in FIELDS}
assert len(_BY_NAME) == len(FIELDS), "a field is listed twice"


def field(name: str) -> Field:
    """The :class:`Field` of a dotted name.

    Raises:
      UserError: no such field, with the closest known name.
    """
    if name in _BY_NAME:
        return _BY_NAME[name]
    close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UserError(f"unknown config field {name}{hint}")


def field_defaults() -> dict[str, Any]:
    """Every field's default by dotted name, in the table's order."""
    return {f.name: f.default for f in FIELDS}


def field_names() -> list[str]:
    """Every field's dotted name, in the table's order."""
    return [f.name for f in FIELDS]


def field_meanings() -> dict[str, str]:
    """What each field means (:attr:`Field.description`), by dotted name."""
    return {f.name: f.description for f in FIELDS}


def resume_keys() -> tuple[str, ...]:
    """The fields a checkpoint fixes: a run resumes, is evaluated or sampled only with its
    own values of these."""
    return tuple(f.name for f in FIELDS if f.fixed_by_checkpoint)


def base_config() -> ml_collections.ConfigDict:
    """A new config with every field at its default, in sections (``config.model.n_embd``).
    A field without a default is an ml_collections placeholder of its type (None until set,
    yet settable from the command line)."""
    config = ml_collections.ConfigDict()
    for f in FIELDS:
        *sections, name = f.name.split(".")
        section = config
        for part in sections:
            if part not in section:
                section[part] = ml_collections.ConfigDict()
            section = section[part]
        section[name] = config_dict.placeholder(f.type) if f.default is None else f.default
    return config


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


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _type_ok(value: Any, kind: type) -> tuple[bool, str]:
    """Whether ``value`` has the field type ``kind``, and how to say that type."""
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
        wrong type or out of range (each field's :class:`Rule`), an unknown field (with the
        closest known name) or a missing one, ``model.gamma_min >= model.gamma_max``,
        ``model.variance_gradient`` with ``model.timesteps > 0``, ``data.name='folder'``
        without ``data.data_dir``, or with ``model.family='mulan'`` every field that has no
        meaning for its per-pixel schedule (weightings, adaptive noise levels, discrete time,
        ...; one error naming them all) and ``model.latent_k > model.latent_size``.
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"config must be an ml_collections.ConfigDict, got {type(config).__name__}")
    flat = flatten(config.to_dict())
    for name in flat:
        if name not in _BY_NAME:
            close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(f"unknown config field {name} (= {flat[name]!r}){hint}")
    for f in FIELDS:
        if f.name not in flat:
            raise UserError(f"config field {f.name} is missing (the base config has {f.default!r})")
        value = flat[f.name]
        ok, expected = _type_ok(value, f.type)
        if ok and value is not None and f.rule is not None:
            ok, expected = f.rule.check(value), f.rule.expected
        if not ok:
            raise UserError(f"{f.name} must be {expected}, got {value!r}")
    _check_combinations(config)


def _check_combinations(config: ml_collections.ConfigDict) -> None:
    """The checks that involve more than one field."""
    m = config.model
    if not m.gamma_min < m.gamma_max:
        raise UserError(
            "model.gamma_min must be below model.gamma_max, got "
            f"gamma_min={m.gamma_min}, gamma_max={m.gamma_max}"
        )
    if m.family == "mulan":  # first: one error naming every field it gives no meaning to
        _check_mulan(config)
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


def _mulan_refusals() -> dict[str, tuple[Any, ...]]:
    """The fields with no meaning for MuLAN (model.family='mulan': a per-pixel schedule,
    continuous time, an unconditional network, the samplers with per-pixel alphas), each
    with the values it may keep."""
    return {
        "objective.weighting": ("elbo",),
        "objective.noise_levels": ("schedule",),
        "model.variance_gradient": (False,),
        "model.timesteps": (0,),
        "model.schedule": (_BY_NAME["model.schedule"].default,),
        "model.network": ("unet",),
        "model.conditioning_input": (False,),
        "model.num_classes": (0,),
        "model.reconstruction_window": (0,),
        "model.parameterization": ("eps", "v"),
        "eval.discrete_timesteps": (0,),
        "sampling.sampler": ("ancestral", "ddim"),
        "sampling.decode": ("argmax",),
    }


def _check_mulan(config: ml_collections.ConfigDict) -> None:
    """A MuLAN config: no field that has no meaning for it, and k <= D for topk."""
    flat = flatten(config.to_dict())
    refused = [
        f"{name}={flat[name]!r} (use {' or '.join(map(repr, allowed))})"
        for name, allowed in _mulan_refusals().items()
        if flat[name] not in allowed
    ]
    if refused:
        raise UserError(
            "model.family='mulan' (a learned schedule per pixel, continuous time, unconditional) "
            "gives no meaning to " + ", ".join(refused) + "; set these fields so, or use "
            "model.family='vdm'"
        )
    m = config.model
    if m.latent_kind == "topk" and m.latent_k > m.latent_size:
        raise UserError(
            f"model.latent_k={m.latent_k} exceeds model.latent_size={m.latent_size}: the topk "
            "latent sets k of its D entries; lower latent_k or raise latent_size"
        )


def with_defaults(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config from a saved dict (a run's ``config.json``): the base config updated with the
    saved values, so that fields added since the run was written take their defaults.
    Unknown saved fields are kept (and refused by :func:`check_config`)."""
    config = base_config()
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
