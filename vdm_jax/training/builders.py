"""What a checked experiment config builds: the model (a VDM, its score network by name, see
:func:`register_network`; or a MuLAN, :func:`mulan_from_config`), its weighting of the loss,
the optimizer, and the size of the adaptive noise-level histogram. The config is checked first
(:func:`vdm_jax.training.schema.check_config`); these trust it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import optax

from vdm_jax.errors import UserError
from vdm_jax.maths import weightings
from vdm_jax.maths.mulan import PolynomialSchedule
from vdm_jax.models.mulan import LatentConditionedUNet, LatentEncoder, MuLAN
from vdm_jax.models.unet import ScoreUNet
from vdm_jax.models.vdm import VDM, make_schedule
from vdm_jax.training import steps

__all__ = [
    "NETWORKS",
    "build_optimizer",
    "build_weighting",
    "model_from_config",
    "mulan_from_config",
    "noise_bins",
    "register_network",
    "unregister_network",
]


def _unet(m: ml_collections.ConfigDict) -> ScoreUNet:
    return ScoreUNet(**_unet_fields(m))


def _block_fields(m: ml_collections.ConfigDict) -> dict:
    """The fields of the ResNet blocks that the U-Net and MuLAN's encoder share."""
    return dict(
        dropout_rate=m.dropout_rate,
        attention_everywhere=m.attention_everywhere,
        with_fourier_features=m.with_fourier_features,
        fourier_exponents=tuple(m.fourier_exponents),
        norm_groups=m.norm_groups,
        norm_min_group_size=m.norm_min_group_size,
    )


def _unet_fields(m: ml_collections.ConfigDict) -> dict:
    return dict(
        n_layer=m.n_layer,
        n_embd=m.n_embd,
        gamma_min=m.gamma_min,
        gamma_max=m.gamma_max,
        **_block_fields(m),
        conditioning_input=m.conditioning_input,
        num_classes=m.num_classes,
        dtype=jnp.dtype(m.dtype),
        attention=m.attention,
        batch_pieces=m.batch_pieces,
        remat=m.remat,
    )


#: The score networks a config's ``model.network`` names: name -> factory, called with the
#: checked ``config.model`` section. Read it; add to it with :func:`register_network`.
NETWORKS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {"unet": _unet}
_BUILT_IN_NETWORKS = frozenset(NETWORKS)


def register_network(name: str, factory: Callable[[ml_collections.ConfigDict], nn.Module]) -> None:
    """Adds a score network under ``name``: a config's ``model.network`` accepts the name and
    :func:`model_from_config` builds the network with it.

    Args:
      name: a new name (not one of :data:`NETWORKS`).
      factory: called ``factory(config.model)`` with the checked ``model`` section (read the
        fields it needs, e.g. ``n_embd``, ``dropout_rate``, ``num_classes``); returns a Linen
        module with the signature of :class:`~vdm_jax.models.unet.ScoreUNet`,
        ``net(z, gamma_t, labels, train=...) -> eps_hat`` with z and eps_hat float32
        ``[B, H, W, C]``, gamma_t ``[B]`` and labels int32 ``[B]`` (plus ``conditioning=`` when
        ``model.conditioning_input`` is set).

    Raises:
      UserError: the name is taken, or the factory is not callable with one argument.
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"register_network: the name must be a non-empty string, got {name!r}")
    if name in NETWORKS:
        raise UserError(f"register_network: the network {name!r} is already registered")
    try:
        inspect.signature(factory).bind(None)
    except (TypeError, ValueError):
        raise UserError(
            f"register_network: the factory of {name!r} must be callable as "
            f"factory(config.model), got {factory!r}"
        ) from None
    NETWORKS[name] = factory


def unregister_network(name: str) -> None:
    """Removes a network added by :func:`register_network`.

    Raises:
      UserError: ``name`` was not registered, or is the built-in ``"unet"``.
    """
    if name in _BUILT_IN_NETWORKS or name not in NETWORKS:
        raise UserError(f"unregister_network: {name!r} is not a registered network")
    del NETWORKS[name]


def model_from_config(
    config: ml_collections.ConfigDict,
    vocab_size: int,
    image_shape: tuple[int, int, int] | None = None,
) -> VDM | MuLAN:
    """The model a checked config describes, for data with ``vocab_size`` values.

    ``model.family='vdm'``: a :class:`~vdm_jax.models.vdm.VDM` whose score network is
    ``NETWORKS[config.model.network]``. ``'mulan'``: a :class:`~vdm_jax.models.mulan.MuLAN`
    (:func:`mulan_from_config`) for images of ``image_shape`` (H, W, C), which it then needs.
    """
    m = config.model
    if m.family == "mulan":
        if image_shape is None:
            raise UserError("model.family='mulan' needs the data's image_shape: its schedule has "
                            "one gamma per pixel")  # fmt: skip
        return mulan_from_config(config, vocab_size, image_shape)
    return VDM(
        score_net=NETWORKS[m.network](m),
        schedule=make_schedule(m.schedule, m.gamma_min, m.gamma_max, m.schedule_features),
        vocab_size=vocab_size,
        num_steps=m.timesteps,
        antithetic_time_sampling=m.antithetic_time_sampling,
        variance_gradient=m.variance_gradient,
        reconstruction_window=m.reconstruction_window,
        parameterization=m.parameterization,
        weighting=build_weighting(config),
    )


def mulan_from_config(
    config: ml_collections.ConfigDict, vocab_size: int, image_shape: tuple[int, int, int]
) -> MuLAN:
    """The :class:`~vdm_jax.models.mulan.MuLAN` of a checked config with
    ``model.family='mulan'``: the score network is the config's U-Net (``model.n_layer``,
    ``n_embd``, ...) taking the latent c, the encoder q(c|x) has ``model.encoder_n_layer``
    blocks of ``model.encoder_n_embd`` channels (dropout, attention, Fourier features and
    GroupNorm as the U-Net's), and the polynomial schedule ``model.schedule_features`` hidden
    units and the fixed endpoints ``model.gamma_min``, ``gamma_max``."""
    m = config.model
    net = LatentConditionedUNet(
        **{**_unet_fields(m), "conditioning_input": True}, latent_size=m.latent_size
    )
    encoder = LatentEncoder(
        latent_size=m.latent_size,
        kind=m.latent_kind,
        n_layer=m.encoder_n_layer,
        n_embd=m.encoder_n_embd,
        **_block_fields(m),
    )
    schedule = PolynomialSchedule(
        image_shape=(image_shape[0], image_shape[1], image_shape[2]),
        n_features=m.schedule_features,
        gamma_min=m.gamma_min,
        gamma_max=m.gamma_max,
    )
    return MuLAN(
        score_net=net,
        schedule=schedule,
        encoder=encoder,
        latent_k=m.latent_k if m.latent_kind == "topk" else 1,
        parameterization=m.parameterization,
        vocab_size=vocab_size,
        antithetic_time_sampling=m.antithetic_time_sampling,
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
