"""Compiling the train and eval steps for many devices: ``jax.jit`` over a mesh, or ``pmap``.

Two modes with the same results (see :mod:`vdm_jax.train` for why the random numbers agree):

- ``'jit'`` (default): one program over a :class:`jax.sharding.Mesh` with a ``'data'`` axis;
  the batch is sharded over it, the state replicated, the state donated.
- ``'pmap'``: ``jax.pmap`` over the local devices with ``lax.pmean`` of gradients; the state
  carries a leading device axis while on the devices.

Both can run several steps per dispatch (``lax.scan`` over stacked batches). Batches enter
as each process's share of the global batch (numpy), as the data pipeline yields them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdm_jax import train

PyTree = Any
MODES = ("jit", "pmap")
DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A one-axis ('data') mesh over the first ``num_devices`` devices (all by default)."""
    available = jax.device_count()
    num_devices = available if num_devices in (None, -1) else num_devices
    if not 1 <= num_devices <= available:
        raise ValueError(f"num_devices must be in 1..{available}, got {num_devices}")
    # Auto axes: the compiler propagates the batch sharding through the vmapped shards.
    return jax.make_mesh(
        (num_devices,),
        (DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:num_devices],
    )


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Places states and batches on devices and compiles steps, in 'jit' or 'pmap' mode.

    Attributes:
      mode: 'jit' or 'pmap'.
      mesh: the devices (for 'pmap', its devices must be the local ones).
    """

    mode: str
    mesh: Mesh

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"parallel mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "pmap" and jax.process_count() > 1:
            raise ValueError("pmap mode runs on one process; use mode='jit' for multi-host")

    @property
    def num_shards(self) -> int:
        """Data shards of a global batch: one per device."""
        return self.mesh.devices.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    def check_batch_size(self, global_batch_size: int) -> None:
        """Raise ValueError unless the global batch splits evenly over the devices."""
        if global_batch_size % self.num_shards:
            raise ValueError(
                f"the global batch size {global_batch_size} is not divisible by the "
                f"{self.num_shards} devices"
            )

    def put_state(self, state: PyTree) -> PyTree:
        """A host or device state onto the devices (replicated; stacked for pmap)."""
        if self.mode == "pmap":
            n, stacked = self.num_shards, NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
            return jax.tree.map(
                lambda x: jax.device_put(jnp.broadcast_to(x, (n, *jnp.shape(x))), stacked), state
            )
        # Copy first: the train step donates its state, which must not delete the caller's.
        return jax.device_put(jax.tree.map(jnp.copy, state), self.replicated)

    def get_state(self, state: PyTree) -> PyTree:
        """The state without the pmap device axis (for checkpoints and evaluation)."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x[0], state)
        return state

    def put_batch(self, batch: dict[str, np.ndarray], stacked: bool = False) -> PyTree:
        """This process's share of a training batch onto the devices, as the train step wants it.

        Args:
          batch: numpy arrays with the batch on axis 0 (axis 1 when ``stacked``: several
            steps' batches for one dispatch).
          stacked: whether axis 0 counts steps.
        """
        if self.mode == "pmap":
            n = self.num_shards

            def split(x):
                x = np.asarray(x)
                lead = x.shape[: int(stacked)]
                x = x.reshape(*lead, n, x.shape[len(lead)] // n, *x.shape[len(lead) + 1 :])
                return np.moveaxis(x, len(lead), 0)

            return jax.tree.map(split, batch)
        return self.put_global_batch(batch, stacked)

    def put_global_batch(self, batch: dict[str, np.ndarray], stacked: bool = False) -> PyTree:
        """This process's share of a batch as global arrays sharded over the mesh (any mode;
        what :meth:`compile_eval_step` takes)."""
        spec = PartitionSpec(None, DATA_AXIS) if stacked else PartitionSpec(DATA_AXIS)
        sharding = NamedSharding(self.mesh, spec)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
        )

    def compile_train_step(
        self, step_fn: Callable, steps_per_dispatch: int = 1
    ) -> Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, dict]]:
        """Compile ``step_fn(state, batch, key, *, num_shards, axis_name) -> (state, metrics)``.

        With ``steps_per_dispatch > 1`` the batch carries a leading axis of that many steps
        (``put_batch(..., stacked=True)``) and the metrics come back stacked.
        The state argument is donated.
        """
        if steps_per_dispatch < 1:
            raise ValueError(f"steps_per_dispatch must be at least 1, got {steps_per_dispatch}")
        if self.mode == "pmap":
            one = functools.partial(step_fn, num_shards=1, axis_name=DATA_AXIS)
        else:
            one = functools.partial(step_fn, num_shards=self.num_shards, axis_name=None)

        if steps_per_dispatch == 1:
            run = one
        else:
            # Unrolled on CPUs: XLA:CPU leaves the convolutions of a loop body's backward pass in
            # a form its fast (Eigen/YNNPACK) kernels do not take, about 10x slower.
            unroll = self.mesh.devices.flat[0].platform == "cpu"

            def run(state, batches, key):
                return jax.lax.scan(lambda s, b: one(s, b, key), state, batches, unroll=unroll)

        if self.mode == "pmap":
            return jax.pmap(
                run,
                axis_name=DATA_AXIS,
                in_axes=(0, 0, None),
                devices=list(self.mesh.devices.flat),
                donate_argnums=(0,),
            )
        batch_spec = PartitionSpec(None, DATA_AXIS) if steps_per_dispatch > 1 else None
        batch_sharding = NamedSharding(self.mesh, batch_spec) if batch_spec else self.batch_sharding
        return jax.jit(
            run,
            in_shardings=(self.replicated, batch_sharding, self.replicated),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=(0,),
        )

    def compile_eval_step(self, eval_fn: Callable) -> Callable:
        """Compile ``eval_fn(params, batch, key, *, num_shards) -> per-example pytree``.

        Evaluation always runs as one jitted program over the mesh (in both modes); the
        per-example outputs come back as global arrays ``[B]``.
        """
        return jax.jit(
            functools.partial(eval_fn, num_shards=self.num_shards),
            in_shardings=(self.replicated, self.batch_sharding, self.replicated),
            out_shardings=self.replicated,
        )

    def put_params(self, params: PyTree) -> PyTree:
        """Parameters (without a device axis) replicated over the mesh, for evaluation."""
        return jax.device_put(params, self.replicated)


def make_train_step(model, optimizer, ema_decay: float, learning_rate_fn=None) -> Callable:
    """:func:`vdm_jax.train.train_step` with the model and optimizer bound, ready to compile."""
    return functools.partial(
        train.train_step,
        model=model,
        optimizer=optimizer,
        ema_decay=ema_decay,
        learning_rate_fn=learning_rate_fn,
    )


def make_eval_step(model, num_steps: int | None = None) -> Callable:
    """:func:`vdm_jax.train.eval_terms` with the model bound, ready to compile."""
    return functools.partial(train.eval_terms, model=model, num_steps=num_steps)


def to_host(tree: PyTree) -> PyTree:
    """Fully replicated or addressable arrays to numpy (for metrics)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


__all__ = ["MODES", "DataParallel", "make_eval_step", "make_mesh", "make_train_step", "to_host"]
