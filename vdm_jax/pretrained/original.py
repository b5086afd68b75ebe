"""Checkpoints of the original VDM code (google-research/vdm), read without TensorFlow.

The authors released CIFAR-10 checkpoints in the format of their code: a folder holding
TensorFlow's text index ``checkpoint`` (``model_checkpoint_path: "ckpt-N"``) beside
``ckpt-N.flax``, the msgpack bytes of ``flax.serialization.to_bytes`` of their train state
``{step, params, ema_params, opt_state}`` (the ``ckpt-N.index`` / ``.data-*`` files are
TensorFlow's half, not needed here)::

    gs://gresearch/vdm/cifar10/checkpoint-final/checkpoints-0       no augmentation
    gs://gresearch/vdm/cifar10/aug-checkpoint-final/checkpoints-0   flips and rotations

:func:`load_original_checkpoint` reads one (a local path or ``gs://``, which needs
``gcsfs``), infers the architecture from the parameter tree and returns our
:class:`~vdm_jax.models.vdm.VDM` with the checkpoint's weights, computing the same function as their
code::

    model, variables = load_original_checkpoint(path, params="ema")
    gamma_t = model.apply(variables, t, method=model.gamma)
    eps_hat = model.apply(variables, z, gamma_t, conditioning=c, method=model.predict_noise)

What the tree tells: the image channels, the number of blocks and their width, per-block
attention, Fourier features, the scalar conditioning input (their network always has one;
their augmented model feeds it the flag "this image was flipped or rotated", the other zeros)
and the schedule: ``learnable_scalar`` -> ``learned_linear``, ``fixed`` -> ``fixed_linear``,
``learnable_nnet`` -> ``monotonic_unnormalised`` (their exact function, whose endpoints drift
during training). Their GroupNorm always has 32 groups, whatever the width
(``norm_min_group_size=1``). What it does not tell comes from the keyword arguments, whose
defaults are the values of the authors' configs: ``gamma_min``/``gamma_max`` (-13.3, 5; the
score network's normalisation of gamma, and the fixed schedule's endpoints), ``vocab_size``
(256), continuous time, dropout 0.1.

:func:`vdm_jax.pretrained.mulan.load_mulan_checkpoint` does the same for checkpoints of MuLAN's
code (s-sahoo/MuLAN, Sahoo et al. 2024), which keep this layout.

This module reads files only: it never imports orbax, grain or tensorflow_datasets.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vdm_jax.errors import UserError
from vdm_jax.maths import schedules
from vdm_jax.models.unet import ScoreUNet
from vdm_jax.models.vdm import SCHEDULES, VDM, make_schedule

__all__ = [
    "OriginalArchitecture",
    "OriginalCheckpoint",
    "build_model",
    "convert_tree",
    "find_checkpoint_file",
    "infer_architecture",
    "load_original_checkpoint",
    "original_checkpoint",
    "read_original_checkpoint",
    "read_train_state",
    "score_network_fields",
]

# Their base-2 Fourier features: exponents 6 and 7, a sine and a cosine of each per channel.
FOURIER_EXPONENTS = (6, 7)
FOURIER_FACTOR = 1 + 2 * len(FOURIER_EXPONENTS)
# Their GroupNorm's group count (flax's default), whatever the width.
NORM_GROUPS = 32

# Their schedule module's parameter names -> our schedule kind.
_SCHEDULE_KINDS = {
    frozenset(): "fixed_linear",
    frozenset({"w", "b"}): "learned_linear",
    frozenset({"l1", "l2", "l3"}): "monotonic_unnormalised",
}

# Our module and parameter names -> theirs (path components; block indices by the pattern).
_ORIGINAL_NAMES = {
    "score_net": "score_model",
    "schedule": "gamma",
    "cond_dense_0": "dense0",
    "cond_dense_1": "dense1",
    "norm_out": "GroupNorm_0",
    "norm": "GroupNorm_0",
    "norm1": "GroupNorm_0",
    "norm2": "GroupNorm_1",
    "skip_proj": "nin_shortcut",
    "query": "q",
    "key": "k",
    "value": "v",
    "mid_attn": "mid.attn_1",
    "gamma_min": "b",  # learned linear: gamma(t) = b + |w| t
    "gamma_range": "w",
}
_KIND_NAMES: dict[Any, str] = {cls: kind for kind, cls in SCHEDULES.items()}
_BLOCK_NAME = re.compile(r"^(down|mid|up)_(block|attn)_(\d+)$")


def score_network_fields(
    n_layer: int,
    n_embd: int,
    attention_everywhere: bool,
    with_fourier_features: bool,
    conditioning_input: bool,
) -> dict[str, Any]:
    """The ``model`` fields of our U-Net that compute the original code's score network
    (shared by MuLAN's, a fork of it): the read sizes, and their fixed Fourier exponents,
    GroupNorm of 32 groups of any size, and no class labels."""
    return {
        "n_layer": n_layer,
        "n_embd": n_embd,
        "attention_everywhere": attention_everywhere,
        "with_fourier_features": with_fourier_features,
        "fourier_exponents": FOURIER_EXPONENTS,
        "norm_groups": NORM_GROUPS,
        "norm_min_group_size": 1,
        "conditioning_input": conditioning_input,
        "num_classes": 0,
    }


@dataclasses.dataclass(frozen=True)
class OriginalArchitecture:
    """The architecture of an original-code checkpoint, as read from its parameter tree.

    Attributes:
      image_channels: C of the images (3 for CIFAR-10).
      n_layer: ResNet blocks before the middle (their ``sm_n_layer``).
      n_embd: channels of every block (their ``sm_n_embd``).
      attention_everywhere: self-attention after every block (their ``with_attention``).
      with_fourier_features: base-2 Fourier features of z at the input.
      conditioning_input: the scalar conditioning concatenated to the time embedding.
      schedule: our schedule kind: fixed_linear, learned_linear or monotonic_unnormalised.
      schedule_features: hidden width of the network schedule (0 for the linear ones).
    """

    image_channels: int
    n_layer: int
    n_embd: int
    attention_everywhere: bool
    with_fourier_features: bool
    conditioning_input: bool
    schedule: str
    schedule_features: int

    def model_fields(self) -> dict[str, Any]:
        """The fields of a config's ``model`` section that this architecture fixes."""
        fields = score_network_fields(
            self.n_layer, self.n_embd, self.attention_everywhere, self.with_fourier_features,
            self.conditioning_input,
        )  # fmt: skip
        fields["schedule"] = self.schedule
        if self.schedule == "monotonic_unnormalised":
            fields["schedule_features"] = self.schedule_features
        return fields


@dataclasses.dataclass(frozen=True)
class OriginalCheckpoint:
    """The contents of one original-code checkpoint file, in the original naming.

    Attributes:
      path: the ``ckpt-N.flax`` file read.
      step: the training step it was saved at.
      params: their parameters, a nested dict of float32 numpy arrays.
      ema_params: their EMA of the parameters (what they evaluate), same structure.
      opt_state: their optax state (for AdamW: ``{'0': {'count', 'mu', 'nu'}, ...}``), or None.
      architecture: what the parameter tree says about the model.
    """

    path: str
    step: int
    params: dict[str, Any]
    ema_params: dict[str, Any]
    opt_state: Any
    architecture: OriginalArchitecture


def _as_path(path: str | os.PathLike) -> epath.Path:
    text = os.fspath(path)
    if "://" not in text:
        text = os.path.abspath(os.path.expanduser(text))
    return epath.Path(text)


def _needs_gcsfs(path: epath.Path, error: ImportError) -> UserError:
    return UserError(
        f"{path}: reading it needs an extra package ({error}); install it with "
        "pip install 'vdm-jax[cloud]', or copy the checkpoint to a local folder first"
    )


def find_checkpoint_file(path: str | os.PathLike) -> epath.Path:
    """The ``ckpt-N.flax`` file that ``path`` designates.

    ``path`` is the ``.flax`` file itself, or a folder holding TensorFlow's text index
    ``checkpoint`` (its ``model_checkpoint_path`` names ``ckpt-N``), or a folder holding such a
    folder ``checkpoints-0`` (host 0's, as their runs write it). A folder without the index
    but with ``ckpt-N.flax`` files gives the one with the largest N.

    Raises:
      UserError: nothing of the kind at ``path``, naming it.
      OSError: the path cannot be read (permissions, network).
    """
    root = _as_path(path)
    try:
        if root.is_file():
            return root
        if not root.is_dir():
            raise UserError(
                f"{root}: no such file or folder; give the folder of an original VDM checkpoint "
                "(holding 'checkpoint' and ckpt-N.flax) or the ckpt-N.flax file"
            )
        folder = root
        if not (folder / "checkpoint").exists() and (folder / "checkpoints-0").is_dir():
            folder = folder / "checkpoints-0"
        index = folder / "checkpoint"
        if index.exists():
            match = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', index.read_text(), re.M)
            if match is None:
                raise UserError(
                    f"{index}: not a checkpoint index (no model_checkpoint_path line); give "
                    "the ckpt-N.flax file instead"
                )
            name = os.path.basename(match.group(1))
            found = folder / f"{name}.flax"
            if not found.exists():
                raise UserError(
                    f"{index} names {name!r} but {found} does not exist; copy the whole "
                    "checkpoint folder, or give a ckpt-N.flax file"
                )
            return found
        numbered = []
        for child in folder.iterdir():
            match = re.fullmatch(r"ckpt-(\d+)\.flax", child.name)
            if match:
                numbered.append((int(match.group(1)), child))
        if not numbered:
            raise UserError(
                f"{root}: no original VDM checkpoint in this folder (neither a 'checkpoint' "
                "index nor ckpt-N.flax files); give the folder that holds them, e.g. "
                ".../checkpoint-final/checkpoints-0"
            )
        return max(numbered)[1]
    except ImportError as e:  # gs:// without gcsfs
        raise _needs_gcsfs(root, e) from None


def read_original_checkpoint(path: str | os.PathLike) -> OriginalCheckpoint:
    """Read an original-code checkpoint (see :func:`find_checkpoint_file` for ``path``).

    Returns:
      :class:`OriginalCheckpoint`, with the architecture inferred from ``ema_params``.

    Raises:
      UserError: no checkpoint there, a file that is not (or not all of) a msgpack train
        state, or a parameter tree that matches no known layout; each names the path.
    """
    return original_checkpoint(*read_train_state(path))


def original_checkpoint(file: Any, state: Mapping[str, Any]) -> OriginalCheckpoint:
    """A train state read from ``file`` by :func:`read_train_state` as an
    :class:`OriginalCheckpoint` (the architecture inferred from ``ema_params``).

    Raises:
      UserError: a parameter tree that matches no known layout, naming the file.
    """
    architecture = infer_architecture(state["ema_params"], str(file))
    return OriginalCheckpoint(
        path=str(file),
        step=int(np.asarray(state.get("step", 0))),
        params=state["params"],
        ema_params=state["ema_params"],
        opt_state=state.get("opt_state"),
        architecture=architecture,
    )


def read_train_state(path: str | os.PathLike) -> tuple[epath.Path, dict[str, Any]]:
    """(the ``ckpt-N.flax`` file, its msgpack train state with params and ema_params)."""
    file = find_checkpoint_file(path)
    try:
        data = _read_with_progress(file)
    except ImportError as e:
        raise _needs_gcsfs(file, e) from None
    try:
        state = flax.serialization.msgpack_restore(data)
    except (ValueError, TypeError) as e:  # what msgpack raises on bytes it cannot decode
        raise UserError(
            f"{file}: not a readable msgpack train state ({type(e).__name__}: {e}); the file "
            "is truncated or not a flax checkpoint: copy it again"
        ) from None
    missing = [k for k in ("params", "ema_params") if not isinstance(state, dict) or k not in state]
    if missing:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise UserError(
            f"{file}: not a VDM train state: no {missing[0]!r} entry (found {found}); expected "
            "the keys step, params, ema_params, opt_state of the original code"
        )
    return file, state


def _read_with_progress(file: epath.Path, chunk: int = 1 << 24) -> bytes:
    """The file's bytes, read in chunks under a progress bar (a CIFAR-10 train state is a few
    hundred MB, often in a bucket); the bar shows only on a terminal."""
    from tqdm import tqdm

    parts = []
    with (
        file.open("rb") as f,
        tqdm(total=file.stat().length, unit="B", unit_scale=True, desc=file.name,
             disable=None) as bar,
    ):  # fmt: skip
        while block := f.read(chunk):
            parts.append(block)
            bar.update(len(block))
    return b"".join(parts)


def tree_entry(tree: Mapping[str, Any], key: str, where: str, path: str) -> Any:
    if not isinstance(tree, Mapping) or key not in tree:
        found = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise UserError(
            f"{path}: the parameter tree matches no known layout of the original VDM code: "
            f"missing {where}/{key} (found {found})"
        )
    return tree[key]


def tree_shape(tree: Mapping[str, Any], keys: tuple[str, ...], path: str) -> tuple[int, ...]:
    node: Any = tree
    for i, key in enumerate(keys):
        node = tree_entry(node, key, "/".join(keys[:i]) or "params", path)
    return tuple(np.shape(node))


def infer_architecture(params: Mapping[str, Any], path: str = "checkpoint") -> OriginalArchitecture:
    """Read the architecture off an original-code parameter tree (their naming).

    Args:
      params: ``{'score_model': ..., 'gamma': ...}`` as in their checkpoints.
      path: the file, for error messages.

    Raises:
      UserError: the tree matches no known layout, naming the first missing or unexpected key.
    """
    net = tree_entry(params, "score_model", "params", path)
    conv_in = tree_shape(net, ("conv_in", "kernel"), path)
    conv_out = tree_shape(net, ("conv_out", "kernel"), path)
    if len(conv_in) != 4 or len(conv_out) != 4:
        raise UserError(
            f"{path}: score_model/conv_in/kernel has shape {conv_in} and conv_out/kernel "
            f"{conv_out}; the original code's are 3x3 convolution kernels [3, 3, in, out]"
        )
    channels, n_embd = conv_out[3], conv_in[3]
    if conv_in[2] == channels * FOURIER_FACTOR:
        fourier = True
    elif conv_in[2] == channels:
        fourier = False
    else:
        raise UserError(
            f"{path}: score_model/conv_in/kernel takes {conv_in[2]} input channels for "
            f"{channels}-channel images: neither {channels} (no Fourier features) nor "
            f"{channels * FOURIER_FACTOR} (Fourier features 2^6, 2^7)"
        )
    n_layer = sum(1 for k in net if re.fullmatch(r"down\.block_\d+", k))
    attention = "down.attn_0" in net or (n_layer == 0 and "up.attn_0" in net)
    cond_inputs = tree_shape(net, ("dense0", "kernel"), path)[0]
    if cond_inputs not in (n_embd, n_embd + 1):
        raise UserError(
            f"{path}: score_model/dense0/kernel takes {cond_inputs} inputs; the original "
            f"network with {n_embd} channels takes {n_embd + 1} (time embedding and the "
            "conditioning input)"
        )
    gamma = params.get("gamma", {})
    names = frozenset(gamma) if isinstance(gamma, Mapping) else None
    if names not in _SCHEDULE_KINDS:
        raise UserError(
            f"{path}: the noise schedule's parameters gamma/{sorted(names or [])} match none of "
            "the original code's schedules (learnable_scalar: w, b; learnable_nnet: l1, l2, "
            "l3; fixed: none)"
        )
    kind = _SCHEDULE_KINDS[names]
    features = (
        tree_shape(gamma, ("l2", "kernel"), path)[-1] if kind == "monotonic_unnormalised" else 0
    )
    unexpected = sorted(set(params) - {"score_model", "gamma"})
    if unexpected:
        raise UserError(
            f"{path}: the parameter tree matches no known layout of the original VDM code: "
            f"unexpected top-level entry {unexpected[0]!r}"
        )
    return OriginalArchitecture(
        image_channels=channels,
        n_layer=n_layer,
        n_embd=n_embd,
        attention_everywhere=attention,
        with_fourier_features=fourier,
        conditioning_input=cond_inputs == n_embd + 1,
        schedule=kind,
        schedule_features=features,
    )


def build_model(
    architecture: OriginalArchitecture,
    *,
    gamma_min: float = schedules.GAMMA_MIN,
    gamma_max: float = schedules.GAMMA_MAX,
    vocab_size: int = 256,
    dropout_rate: float = 0.1,
    num_steps: int = 0,
    antithetic_time_sampling: bool = True,
) -> VDM:
    """Our :class:`~vdm_jax.models.vdm.VDM` that computes what the original code's model did.

    Args:
      architecture: from :func:`infer_architecture`.
      gamma_min, gamma_max: their config's values (-13.3 and 5 in every released config): the
        score network maps gamma to [0, 1] with them; the fixed schedule's endpoints.
      vocab_size: V (256 for 8-bit images).
      dropout_rate: their ``sm_pdrop`` (0.1 for cifar10, 0.05 for cifar10_aug); training only.
      num_steps: their ``sm_n_timesteps``: 0 for continuous time.
      antithetic_time_sampling: as their ``antithetic_time_sampling`` (True in their configs).
    """
    net = ScoreUNet(
        n_layer=architecture.n_layer,
        n_embd=architecture.n_embd,
        gamma_min=gamma_min,
        gamma_max=gamma_max,
        dropout_rate=dropout_rate,
        attention_everywhere=architecture.attention_everywhere,
        with_fourier_features=architecture.with_fourier_features,
        fourier_exponents=FOURIER_EXPONENTS,
        norm_groups=NORM_GROUPS,
        norm_min_group_size=1,
        conditioning_input=architecture.conditioning_input,
    )
    schedule = make_schedule(
        architecture.schedule, gamma_min, gamma_max, max(architecture.schedule_features, 1)
    )
    return VDM(
        score_net=net,
        schedule=schedule,
        vocab_size=vocab_size,
        num_steps=num_steps,
        antithetic_time_sampling=antithetic_time_sampling,
    )


def original_name(path: tuple[str, ...]) -> tuple[str, ...]:
    """Our parameter path -> the original code's."""
    out = []
    for part in path:
        block = _BLOCK_NAME.match(part)
        out.append(
            f"{block[1]}.{block[2]}_{block[3]}" if block else _ORIGINAL_NAMES.get(part, part)
        )
    return tuple(out)


def _parameter_shapes(model: VDM, image_channels: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our model's flattened parameter shapes (they do not depend on the image size)."""
    images = jnp.zeros((1, 8, 8, image_channels), jnp.uint8)
    conditioning = jnp.zeros((1,), jnp.float32) if model.score_net.conditioning_input else None
    key = jax.random.key(0)
    shapes = jax.eval_shape(
        lambda: model.init(
            {"params": key, "diffusion": key}, images, conditioning=conditioning, train=False
        )
    )
    flat = flax.traverse_util.flatten_dict(shapes["params"])
    return {k: tuple(v.shape) for k, v in flat.items()}


def convert_tree(
    tree: Mapping[str, Any],
    model: VDM,
    image_channels: int,
    path: str = "checkpoint",
    what: str = "params",
) -> dict[str, Any]:
    """An original-code parameter tree (or one of its Adam moment trees) in our naming.

    Args:
      tree: ``{'score_model': ..., 'gamma': ...}`` in their naming (params, ema_params, or
        the ``mu``/``nu`` of their Adam state, which have the same structure).
      model: from :func:`build_model` for the tree's architecture.
      image_channels: C of the images.
      path, what: the file and the tree's name within it, for error messages.

    Returns:
      ``{'score_net': ..., 'schedule': ...}`` (our ``variables['params']``), float32 arrays.

    Raises:
      UserError: a missing or unexpected key, or a shape that differs from the one the model
        needs, naming the first such key in the original naming.
    """
    ours = _parameter_shapes(model, image_channels)
    return convert_flat(tree, ours, original_name, path, what, "original VDM", _describe(model))


def convert_flat(tree, ours, original_name, path, what, code, layout) -> dict[str, Any]:
    """``tree`` (their naming) as our parameters of the flattened ``ours`` shapes, checked
    key by key; ``original_name`` maps our paths to theirs; ``code`` and ``layout`` name the
    code and the inferred layout in errors."""
    wanted = {original_name(k): k for k in ours}
    theirs = flax.traverse_util.flatten_dict(dict(tree))
    unexpected = sorted(set(theirs) - set(wanted))
    missing = sorted(set(wanted) - set(theirs))
    if unexpected or missing:
        problem = (
            f"unexpected key {'/'.join(unexpected[0])}"
            if unexpected
            else f"missing key {'/'.join(missing[0])}"
        )
        raise UserError(
            f"{path}: {what} matches no known layout of the {code} code: {problem} "
            f"(the layout inferred from the tree: {layout})"
        )
    converted = {}
    for their_key, our_key in wanted.items():
        value = np.asarray(theirs[their_key])
        shape = ours[our_key]
        if value.shape != shape and not (value.size == 1 and int(np.prod(shape)) == 1):
            raise UserError(
                f"{path}: {what}/{'/'.join(their_key)} has shape {value.shape}, but the layout "
                f"inferred from the tree ({layout}) needs {shape}"
            )
        converted[our_key] = jnp.asarray(value.reshape(shape), jnp.float32)
    return flax.traverse_util.unflatten_dict(converted)


def _describe(model: VDM) -> str:
    net = model.score_net
    return (
        f"n_layer={net.n_layer}, n_embd={net.n_embd}, "
        f"attention_everywhere={net.attention_everywhere}, "
        f"with_fourier_features={net.with_fourier_features}, "
        f"schedule={_KIND_NAMES.get(type(model.schedule), type(model.schedule).__name__)}"
    )


def load_original_checkpoint(
    path: str | os.PathLike, params: str = "ema", **model_options: Any
) -> tuple[VDM, dict[str, Any]]:
    """Our model and variables from an original-code checkpoint (local or ``gs://``).

    Args:
      path: the checkpoint folder (``.../checkpoints-0``) or its ``ckpt-N.flax`` file.
      params: ``"ema"`` (their EMA weights, what they evaluated and sampled) or ``"params"``
        (the raw weights).
      **model_options: keyword arguments of :func:`build_model` (``gamma_min``,
        ``gamma_max``, ``vocab_size``, ``dropout_rate``, ``num_steps``,
        ``antithetic_time_sampling``) for what the tree does not record.

    Returns:
      ``(model, variables)``: a :class:`~vdm_jax.models.vdm.VDM` and ``{'params': ...}``, with
      which ``model.apply(variables, t, method=model.gamma)`` is their ``gamma(t)`` and
      ``model.apply(variables, z, gamma_t, conditioning=c, method=model.predict_noise)`` their
      ``score_model(z, gamma_t, c, deterministic=True)``.

    Raises:
      UserError: bad input (see :func:`read_original_checkpoint`), or ``params`` not one of
        the two names.
    """
    if params not in ("ema", "params"):
        raise UserError(f"params must be 'ema' or 'params', got {params!r}")
    checkpoint = read_original_checkpoint(path)
    architecture = checkpoint.architecture
    model = build_model(architecture, **model_options)
    tree = checkpoint.ema_params if params == "ema" else checkpoint.params
    what = "ema_params" if params == "ema" else "params"
    converted = convert_tree(tree, model, architecture.image_channels, checkpoint.path, what)
    return model, {"params": converted}


# ----------------------------------------------------------------------------------------------
# MuLAN (s-sahoo/MuLAN): the same on-disk layout, params {encoder_model, gamma, score_model}.
