"""Checkpoints of MuLAN's code (s-sahoo/MuLAN, Sahoo et al. 2024), read without TensorFlow.

Their checkpoints keep the original VDM code's layout (:mod:`vdm_jax.pretrained.original`):
``flax.serialization.to_bytes`` of ``{step, params, ema_params, opt_state}`` with
``params = {encoder_model, gamma, score_model}`` and two masked AdamW states.
:func:`load_mulan_checkpoint` infers the architecture and the latent kind from the tree and
returns our :class:`~vdm_jax.models.mulan.MuLAN` computing what their model computes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.errors import UserError
from vdm_jax.maths import schedules
from vdm_jax.maths.mulan import PolynomialSchedule
from vdm_jax.models import mulan
from vdm_jax.pretrained.original import (
    FOURIER_EXPONENTS,
    FOURIER_FACTOR,
    NORM_GROUPS,
    convert_flat,
    original_name,
    read_train_state,
    score_network_fields,
    tree_entry,
    tree_shape,
)

__all__ = [
    "MuLANArchitecture",
    "MuLANCheckpoint",
    "build_mulan_model",
    "convert_mulan_tree",
    "infer_mulan_architecture",
    "is_mulan_state",
    "load_mulan_checkpoint",
    "mulan_checkpoint",
]


_MULAN_TOP = {"score_net": "score_model", "schedule": "gamma", "encoder": "encoder_model"}
# Their encoder heads -> latent kind (their gumbel latent shares topk's head; see the docs).
_MULAN_HEADS = {
    frozenset({"dense_layer_final"}): "topk",
    frozenset({"dense_layer_final_mu", "dense_layer_final_sigma"}): "gaussian",
}


@dataclasses.dataclass(frozen=True)
class MuLANArchitecture:
    """The architecture of a MuLAN checkpoint, as read from its parameter tree.

    Attributes:
      image_shape: (H, W, C); H * W from the encoder's final layer (square images assumed),
        H * W * C from the schedule's output layers.
      n_layer, n_embd, attention_everywhere, with_fourier_features: of the score network
        (their ``sm_n_layer``, ``sm_n_embd``, ``with_attention``, Fourier features).
      latent_kind: ``"topk"`` or ``"gaussian"`` (from the encoder's head).
      latent_size: D (their ``latent_size``).
      encoder_n_layer, encoder_n_embd: the encoder's blocks before the middle (their
        ``forward_n_layer``) and its width.
      schedule_features: hidden width of the polynomial schedule's network.
    """

    image_shape: tuple[int, int, int]
    n_layer: int
    n_embd: int
    attention_everywhere: bool
    with_fourier_features: bool
    latent_kind: str
    latent_size: int
    encoder_n_layer: int
    encoder_n_embd: int
    schedule_features: int

    def model_fields(self) -> dict[str, Any]:
        """The fields of a config's ``model`` section that this architecture fixes (with
        ``family='mulan'``); the tree records neither ``latent_k`` nor the
        parameterization."""
        return {
            "family": "mulan",
            **score_network_fields(
                self.n_layer,
                self.n_embd,
                self.attention_everywhere,
                self.with_fourier_features,
                conditioning_input=False,
            ),
            "schedule_features": self.schedule_features,
            "latent_kind": self.latent_kind,
            "latent_size": self.latent_size,
            "encoder_n_layer": self.encoder_n_layer,
            "encoder_n_embd": self.encoder_n_embd,
        }


@dataclasses.dataclass(frozen=True)
class MuLANCheckpoint:
    """The contents of one MuLAN checkpoint file, in their naming.

    Attributes:
      path: the ``ckpt-N.flax`` file read.
      step: the training step it was saved at.
      params, ema_params: ``{encoder_model, gamma, score_model}`` trees of float32 arrays.
      adam: their AdamW state merged from their two masked ones, ``{count, mu, nu}`` with
        ``mu`` and ``nu`` trees like ``params`` (score_model's from the first AdamW, the
        encoder's and schedule's from the second); None when the file holds no optimizer
        state.
      architecture: what the parameter tree says about the model.
    """

    path: str
    step: int
    params: dict[str, Any]
    ema_params: dict[str, Any]
    adam: dict[str, Any] | None
    architecture: MuLANArchitecture


def _mulan_layout_error(path: str, detail: str) -> UserError:
    return UserError(
        f"{path}: the parameter tree matches no known layout of MuLAN's code: {detail}"
    )


def _unet_trunk(net: Mapping[str, Any], where: str, path: str) -> tuple[int, int, int, bool]:
    """(input channels, n_embd, n_layer, attention_everywhere) of a U-Net or its first half."""
    conv_in = tree_shape(net, ("conv_in", "kernel"), path)
    if len(conv_in) != 4:
        raise _mulan_layout_error(path, f"{where}/conv_in/kernel has shape {conv_in}")
    n_layer = sum(1 for k in net if re.fullmatch(r"down\.block_\d+", k))
    attention = "down.attn_0" in net or (n_layer == 0 and "up.attn_0" in net)
    return conv_in[2], conv_in[3], n_layer, attention


def infer_mulan_architecture(
    params: Mapping[str, Any], path: str = "checkpoint"
) -> MuLANArchitecture:
    """Read the architecture off a MuLAN parameter tree (their naming).

    Raises:
      UserError: the tree matches no known layout, naming the first missing or odd entry.
    """
    unexpected = sorted(set(params) - {"score_model", "gamma", "encoder_model"})
    if unexpected:
        raise _mulan_layout_error(path, f"unexpected top-level entry {unexpected[0]!r}")
    net = tree_entry(params, "score_model", "params", path)
    encoder = tree_entry(params, "encoder_model", "params", path)
    gamma = tree_entry(params, "gamma", "params", path)
    in_channels, n_embd, n_layer, attention = _unet_trunk(net, "score_model", path)
    channels = tree_shape(net, ("conv_out", "kernel"), path)[-1]
    if in_channels not in (channels, channels * FOURIER_FACTOR):
        raise _mulan_layout_error(
            path, f"score_model/conv_in/kernel takes {in_channels} channels for {channels}"
        )
    latent_size = tree_shape(net, ("dense0", "kernel"), path)[0] - n_embd
    heads = frozenset(k for k in encoder if k.startswith("dense_layer_final"))
    if heads not in _MULAN_HEADS:
        raise _mulan_layout_error(
            path,
            f"encoder_model's final layers {sorted(heads)} are neither topk's "
            "(dense_layer_final) nor gaussian's (dense_layer_final_mu, dense_layer_final_sigma)",
        )
    kind = _MULAN_HEADS[heads]
    head = tree_shape(encoder, (sorted(heads)[0], "kernel"), path)
    _, encoder_n_embd, encoder_n_layer, _ = _unet_trunk(encoder, "encoder_model", path)
    if head[1] != latent_size:
        raise _mulan_layout_error(
            path,
            f"encoder_model/{sorted(heads)[0]}/kernel has {head[1]} outputs but score_model/dense0 "
            f"takes a latent of {latent_size}",
        )
    pixels = tree_shape(gamma, ("dense_out_a", "kernel"), path)[1]
    side = math.isqrt(head[0])
    if side * side != head[0] or pixels % head[0] or pixels // head[0] != channels:
        raise _mulan_layout_error(
            path,
            f"gamma/dense_out_a has {pixels} outputs and the encoder's head {head[0]} inputs: "
            f"not a square image of {channels} channels",
        )
    return MuLANArchitecture(
        image_shape=(side, side, channels),
        n_layer=n_layer,
        n_embd=n_embd,
        attention_everywhere=attention,
        with_fourier_features=in_channels != channels,
        latent_kind=kind,
        latent_size=latent_size,
        encoder_n_layer=encoder_n_layer,
        encoder_n_embd=encoder_n_embd,
        schedule_features=tree_shape(gamma, ("dense_1", "kernel"), path)[1],
    )


def is_mulan_state(state: Mapping[str, Any]) -> bool:
    """Whether a train state read from a checkpoint of the original code's layout
    (:func:`~vdm_jax.pretrained.original.read_train_state`) is MuLAN's: its EMA parameters
    hold an ``encoder_model``."""
    ema = state.get("ema_params")
    return isinstance(ema, Mapping) and "encoder_model" in ema


def mulan_checkpoint(file: Any, state: Mapping[str, Any]) -> MuLANCheckpoint:
    """A MuLAN train state read from ``file`` (by
    :func:`~vdm_jax.pretrained.original.read_train_state`) as a :class:`MuLANCheckpoint`:
    the architecture inferred, the optimizer state checked and its Adam moments merged.

    Raises:
      UserError: a tree or optimizer state that matches no MuLAN layout, naming the file.
    """
    architecture = infer_mulan_architecture(state["ema_params"], str(file))
    opt_state = state.get("opt_state")
    _check_mulan_optimizer(opt_state, str(file))
    adam = None
    if opt_state is not None:
        first, second = (opt_state[i]["inner_state"]["0"] for i in ("0", "1"))
        adam = {
            "count": first["count"],
            **{
                moment: {
                    "score_model": first[moment]["score_model"],
                    "encoder_model": second[moment]["encoder_model"],
                    "gamma": second[moment]["gamma"],
                }
                for moment in ("mu", "nu")
            },
        }
    return MuLANCheckpoint(
        path=str(file),
        step=int(np.asarray(state.get("step", 0))),
        params=state["params"],
        ema_params=state["ema_params"],
        adam=adam,
        architecture=architecture,
    )


def _check_mulan_optimizer(opt_state: Any, path: str) -> None:
    """Their optimizer is optax.chain of two masked AdamWs: '0' updates score_model, '1' the
    encoder and the schedule (the masked-out parameters are empty nodes in each moment tree).
    Anything else is not a MuLAN train state."""
    if opt_state is None:
        return
    if not isinstance(opt_state, Mapping) or set(opt_state) != {"0", "1"}:
        found = sorted(opt_state) if isinstance(opt_state, Mapping) else type(opt_state).__name__
        raise UserError(
            f"{path}: opt_state is not MuLAN's chain of two masked AdamW states (entries '0' "
            f"and '1'), found {found}"
        )
    for index, parts in (("0", {"score_model"}), ("1", {"encoder_model", "gamma"})):
        try:
            mu = opt_state[index]["inner_state"]["0"]["mu"]
        except (KeyError, TypeError):
            raise UserError(
                f"{path}: opt_state/{index}/inner_state/0/mu (an AdamW first moment) is missing"
            ) from None
        leaves = flax.traverse_util.flatten_dict(mu) if isinstance(mu, Mapping) else {}
        updated = {k[0] for k, v in leaves.items() if isinstance(v, np.ndarray)}
        if updated != parts:
            raise UserError(
                f"{path}: opt_state/{index} updates {sorted(updated)}; MuLAN's updates "
                f"{sorted(parts)} there"
            )


def build_mulan_model(
    architecture: MuLANArchitecture,
    *,
    latent_k: int = 15,
    parameterization: str = "v",
    gamma_min: float = schedules.GAMMA_MIN,
    gamma_max: float = schedules.GAMMA_MAX,
    vocab_size: int = 256,
    dropout_rate: float = 0.1,
    antithetic_time_sampling: bool = True,
) -> mulan.MuLAN:
    """Our :class:`~vdm_jax.models.mulan.MuLAN` computing what MuLAN's model computes.

    Args:
      architecture: from :func:`infer_mulan_architecture`.
      latent_k: k of the topk latent (their ``latent_k``; 15 in their CIFAR-10 config); not
        recorded in the tree.
      parameterization: ``"v"`` for their ``model_mulan_velocity`` (their config's
        default), ``"eps"`` for ``model_mulan_epsilon``; not recorded in the tree.
      gamma_min, gamma_max, vocab_size, dropout_rate, antithetic_time_sampling: their config's
        values (-13.3, 5, 256, 0.1, True).
    """
    a = architecture
    common: dict[str, Any] = dict(
        dropout_rate=dropout_rate,
        with_fourier_features=a.with_fourier_features,
        fourier_exponents=FOURIER_EXPONENTS,
        norm_groups=NORM_GROUPS,
        norm_min_group_size=1,
    )
    net = mulan.LatentConditionedUNet(
        n_layer=a.n_layer,
        n_embd=a.n_embd,
        gamma_min=gamma_min,
        gamma_max=gamma_max,
        attention_everywhere=a.attention_everywhere,
        latent_size=a.latent_size,
        **common,
    )
    encoder = mulan.LatentEncoder(
        latent_size=a.latent_size,
        kind=a.latent_kind,
        n_layer=a.encoder_n_layer,
        n_embd=a.encoder_n_embd,
        attention_everywhere=a.attention_everywhere,
        **common,
    )
    schedule = PolynomialSchedule(
        image_shape=a.image_shape,
        n_features=a.schedule_features,
        gamma_min=gamma_min,
        gamma_max=gamma_max,
    )
    return mulan.MuLAN(
        score_net=net,
        schedule=schedule,
        encoder=encoder,
        latent_k=latent_k if a.latent_kind == "topk" else 1,
        parameterization=parameterization,
        vocab_size=vocab_size,
        antithetic_time_sampling=antithetic_time_sampling,
    )


def _mulan_original_name(path: tuple[str, ...]) -> tuple[str, ...]:
    return (_MULAN_TOP.get(path[0], path[0]), *original_name(path[1:]))


def load_mulan_checkpoint(
    path: str | os.PathLike, params: str = "ema", **model_options: Any
) -> tuple[mulan.MuLAN, dict[str, Any]]:
    """Our MuLAN model and variables from a checkpoint of MuLAN's code (s-sahoo/MuLAN).

    The checkpoint has the original VDM code's layout (see
    :func:`~vdm_jax.pretrained.original.find_checkpoint_file`),
    with params ``{encoder_model, gamma, score_model}`` and their optimizer's state (a chain
    of two masked AdamWs, checked). The tree gives the image shape, both networks and the
    latent's kind and size; their poly_fixedend schedule, ``vdm`` U-Net, ``unet`` encoder and
    ``z_conditioning`` are the only layout read.

    Args:
      path: the checkpoint folder or its ``ckpt-N.flax`` file.
      params: ``"ema"`` or ``"params"``.
      **model_options: keyword arguments of :func:`build_mulan_model` (``latent_k``,
        ``parameterization``, ...) for what the tree does not record.

    Returns:
      ``(model, variables)``, with which ``model.apply(variables, t, c, method=model.gamma)``
      is their ``_get_gamma(c, t)`` reshaped to ``[B, H, W, C]`` and
      ``model.apply(variables, z, gamma_pixels, c, method=model.predict_noise)`` is eps_hat
      from their score network at that per-pixel gamma (eps_hat = alpha v_hat + sigma z for
      their velocity model).

    Raises:
      UserError: no checkpoint at ``path``, an unreadable file, a tree or optimizer state
        that matches no MuLAN layout, or ``params`` not one of the two names; each names the
        path and the field.
    """
    if params not in ("ema", "params"):
        raise UserError(f"params must be 'ema' or 'params', got {params!r}")
    checkpoint = mulan_checkpoint(*read_train_state(path))
    model = build_mulan_model(checkpoint.architecture, **model_options)
    what = "ema_params" if params == "ema" else "params"
    tree = checkpoint.ema_params if params == "ema" else checkpoint.params
    converted = convert_mulan_tree(tree, model, checkpoint.architecture, checkpoint.path, what)
    return model, {"params": converted}


def convert_mulan_tree(
    tree: Mapping[str, Any],
    model: mulan.MuLAN,
    architecture: MuLANArchitecture,
    path: str = "checkpoint",
    what: str = "params",
) -> dict[str, Any]:
    """A MuLAN parameter tree (or one of the Adam moment trees in the ``adam`` of a
    :class:`MuLANCheckpoint`) in our naming: ``{score_net, schedule, encoder}``, float32
    arrays of ``model``'s shapes.

    Args:
      tree: ``{score_model, gamma, encoder_model}`` in their naming.
      model: a :class:`~vdm_jax.models.mulan.MuLAN` of the tree's architecture (from
        :func:`build_mulan_model`, or a config with the fields of
        :meth:`MuLANArchitecture.model_fields`).
      architecture: the tree's, for the image shape and error messages.
      path, what: the file and the tree's name within it, for error messages.

    Raises:
      UserError: a missing or unexpected key, or a shape that differs from the one the model
        needs, naming the first such key in their naming.
    """
    images = jnp.zeros((1, *architecture.image_shape), jnp.uint8)
    key = jax.random.key(0)
    shapes = jax.eval_shape(
        lambda: model.init({"params": key, "diffusion": key}, images, train=False)
    )
    ours = {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(shapes["params"]).items()}
    layout = ", ".join(
        f"{f.name}={getattr(architecture, f.name)}" for f in dataclasses.fields(architecture)
    )
    return convert_flat(tree, ours, _mulan_original_name, str(path), what, "MuLAN", layout)
