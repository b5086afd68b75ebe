"""The original authors' VDM (google-research/vdm, ``model_vdm.py``) at our benchmark settings.

Their code is not part of this project: :func:`load` imports ``model_vdm.py`` from a folder the
user names (a checkout or a download of https://github.com/google-research/vdm); that file
needs only jax, flax, chex and numpy. :class:`OriginalVDM` builds their model with the
settings of ours (Fourier features, attention in the middle only, learnable scalar schedule,
continuous time, V = 256) and the three programs a side-by-side comparison times, written as
their ``experiment.py`` runs them:

- the train step: the gradient of the batch's mean bits/dim, AdamW (b1 0.9, b2 0.99, eps 1e-8,
  weight decay 0.01 on everything but biases, linear warm-up) and the parameter EMA. Their
  step also builds an image grid of the inputs every step, which is not timed here;
- the evaluation bound of a batch (their model, deterministic, one draw of t and noise);
- ancestral sampling at T steps (``VDM.sample`` in a ``fori_loop``, then ``generate_x``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

FILE = "model_vdm.py"


def find(path: str | None) -> str | None:
    """The path of ``model_vdm.py`` in ``path`` (the file or its folder), or None if absent."""
    if not path:
        return None
    candidate = path if path.endswith(".py") else os.path.join(path, FILE)
    return candidate if os.path.isfile(candidate) else None


def load(path: str) -> ModuleType:
    """Import the authors' ``model_vdm.py`` from ``path`` (the file or its folder).

    Raises:
      FileNotFoundError: naming the path, when there is no such file.
    """
    file = find(path)
    if file is None:
        raise FileNotFoundError(f"no {FILE} at {path!r}: pass a checkout of google-research/vdm")
    spec = importlib.util.spec_from_file_location("original_model_vdm", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_flag(parser) -> None:
    """The scripts' ``--original`` flag (default: the ``VDM_ORIGINAL`` environment variable)."""
    parser.add_argument(
        "--original",
        default=os.environ.get("VDM_ORIGINAL"),
        help="google-research/vdm checkout (or its model_vdm.py); env VDM_ORIGINAL",
    )


def from_args(args) -> OriginalVDM:
    """Their model at a script's ``--original``, ``--n_layer``, ``--n_embd`` and
    ``--resolution`` (RGB images)."""
    return OriginalVDM(
        load(args.original),
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        image_shape=(args.resolution, args.resolution, 3),
    )


def timed_train_step(theirs: OriginalVDM, batches, key) -> tuple[Any, float, Any]:
    """Their train step under jit, compiled for ``batches[0]``, as a timed call.

    Returns:
      ``(call, compile_s, compiled)``: ``call(i)`` puts ``batches[i % len(batches)]["image"]``
      on the device, takes one step of a state it holds (from :meth:`OriginalVDM.init_state`)
      and waits for the loss; it returns its seconds.
    """
    holder = {"state": theirs.init_state()}
    t0 = time.perf_counter()
    compiled = jax.jit(theirs.train_step).lower(holder["state"], batches[0]["image"], key).compile()
    compile_s = time.perf_counter() - t0

    def call(i: int) -> float:
        t0 = time.perf_counter()
        images = jax.device_put(batches[i % len(batches)]["image"])
        holder["state"], bpd = compiled(holder["state"], images, key)
        jax.block_until_ready(bpd)
        return time.perf_counter() - t0

    return call, compile_s, compiled


def _decays(params):
    """Their weight-decay mask: every parameter but the biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "bias", params)


@dataclasses.dataclass
class OriginalVDM:
    """Their model and its train, eval and sampling programs at the given settings.

    Attributes:
      module: the imported ``model_vdm`` (see :func:`load`).
      n_layer, n_embd, dropout_rate: their ``sm_n_layer``, ``sm_n_embd``, ``sm_pdrop``.
      image_shape: ``(H, W, C)`` of the data.
      learning_rate, warmup_steps, ema_rate: their optimizer settings (paper's defaults).
    """

    module: ModuleType
    n_layer: int
    n_embd: int
    image_shape: tuple[int, int, int] = (32, 32, 3)
    dropout_rate: float = 0.1
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    ema_rate: float = 0.9999

    def __post_init__(self):
        config = self.module.VDMConfig(
            vocab_size=256,
            sample_softmax=False,
            antithetic_time_sampling=True,
            with_fourier_features=True,
            with_attention=False,
            gamma_type="learnable_scalar",
            gamma_min=-13.3,
            gamma_max=5.0,
            sm_n_timesteps=0,
            sm_n_embd=self.n_embd,
            sm_n_layer=self.n_layer,
            sm_pdrop=self.dropout_rate,
        )
        self.model = self.module.VDM(config)
        warmup = optax.linear_schedule(0.0, self.learning_rate, self.warmup_steps)
        self.optimizer = optax.adamw(
            warmup, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, mask=_decays
        )
        self.num_dims = int(np.prod(self.image_shape))

    def init_state(self, seed: int = 0) -> dict[str, Any]:
        """``{step, params, ema_params, opt_state}`` as their ``TrainState`` holds them."""
        k_params, k_sample = jax.random.split(jax.random.key(seed))
        images = jnp.zeros((2, *self.image_shape), jnp.uint8)
        params = self.model.init({"params": k_params, "sample": k_sample}, images, jnp.zeros((2,)))[
            "params"
        ]
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "ema_params": jax.tree.map(jnp.copy, params),
            "opt_state": self.optimizer.init(params),
        }

    def _bpd(self, params, images, key, train: bool):
        k_sample, k_dropout = jax.random.split(key)
        out = self.model.apply(
            {"params": params},
            images,
            jnp.zeros((images.shape[0],)),
            deterministic=not train,
            rngs={"sample": k_sample, "dropout": k_dropout},
        )
        nats = out.loss_klz + out.loss_recon + out.loss_diff  # [B]
        return nats / (self.num_dims * np.log(2.0))

    def train_step(self, state, images, key):
        """One update on ``images`` uint8 ``[B, H, W, C]``; returns (state, mean bpd)."""
        key = jax.random.fold_in(key, state["step"])

        def loss(params):
            return jnp.mean(self._bpd(params, images, key, train=True))

        bpd, grads = jax.value_and_grad(loss)(state["params"])
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(
            lambda e, p: e + (1.0 - self.ema_rate) * (p - e), state["ema_params"], params
        )
        new = {
            "step": state["step"] + 1,
            "params": params,
            "ema_params": ema,
            "opt_state": opt_state,
        }
        return new, bpd

    def eval_bpd(self, params, images, key):
        """Bits/dim per example ``[B]`` of ``images`` (no dropout)."""
        return self._bpd(params, images, key, train=False)

    def ancestral_sample(self, params, key, batch: int, num_steps: int):
        """``batch`` images int ``[B, H, W, C]`` from ``num_steps`` ancestral steps."""
        variables = {"params": params}
        conditioning = jnp.zeros((batch,))
        k_init, k_steps = jax.random.split(key)
        z = jax.random.normal(k_init, (batch, *self.image_shape))

        def body(i, z_t):
            return self.model.apply(
                variables,
                i=i,
                T=num_steps,
                z_t=z_t,
                conditioning=conditioning,
                rng=k_steps,
                method=self.model.sample,
            )

        z_0 = jax.lax.fori_loop(0, num_steps, body, z)
        return self.model.apply(variables, z_0=z_0, method=self.model.generate_x)
