"""Compiling the train and eval steps for many devices and hosts: ``jax.jit`` over a mesh, or
``pmap``.

Two modes with the same results (:mod:`vdm_jax.training.steps` says why the random numbers agree):

- ``'jit'`` (default): one program over a :class:`jax.sharding.Mesh` with axes
  ``('data', 'fsdp')``. The batch is sharded over both axes. Parameters, their EMA and their
  optimizer state are replicated, except that with an ``fsdp`` axis larger than 1 every array
  of at least ``fsdp_min_size`` elements is sharded over it along one axis
  (:func:`fsdp_partition_spec`): per-device memory for those arrays falls by the ``fsdp``
  size, and XLA gathers the kernels where they are used. Runs on one or many processes
  (hosts); see :func:`initialize_distributed`.
- ``'pmap'``: ``jax.pmap`` over the local devices of one process with ``lax.pmean`` of
  gradients; the state carries a leading device axis while on the devices.

Both can run several steps per dispatch (``lax.scan`` over stacked batches). Batches enter
as each process's share of the global batch (numpy), as the data pipeline yields them; the
share a process must read is :meth:`DataParallel.process_batch_slot`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdm_jax.errors import UserError

PyTree = Any
MODES = ("jit", "pmap")
DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
#: Arrays with fewer elements than this stay replicated under fsdp (biases, norms, small
#: dense layers): sharding them saves little memory and costs a gather each.
DEFAULT_FSDP_MIN_SIZE = 2**16


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Start JAX's distributed runtime when this is one process of a multi-process run.

    Multi-process means: ``coordinator_address`` or ``num_processes`` is given, the
    environment sets ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``), or ``auto`` asks ``jax.distributed.initialize`` to detect the cluster
    itself (Cloud TPU pod slices, SLURM, Open MPI). Otherwise this does nothing, so a
    single-process run needs no flag. Must run before anything else uses JAX. On CPU
    backends the cross-process collectives use gloo.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator.
      num_processes: number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      auto: initialise even without addresses (cluster auto-detection).

    Returns:
      Whether the distributed runtime was started.

    Raises:
      UserError: an incomplete or inconsistent set of values, naming them.
    """

    def from_env(name: str) -> int | None:
        text = os.environ.get(name, "").strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{name} must be an integer, got {text!r}") from None

    if coordinator_address is None:
        coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = from_env("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = from_env("JAX_PROCESS_ID")
    given = (coordinator_address, num_processes, process_id)
    if not auto and all(v is None for v in given):
        return False
    if not auto and None in given:
        raise UserError(
            "a multi-process run needs coordinator_address, num_processes and process_id "
            f"(or auto-detection); got coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}"
        )
    if num_processes is not None and num_processes < 1:
        raise UserError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(f"process_id must be in [0, {num_processes}), got {process_id}")
    # The CPU client does cross-process collectives only with an implementation chosen; other
    # backends ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    logging.info(
        "process %d of %d: %d local devices of %d",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip
    return True


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
    """The (data, fsdp) sizes for ``num_devices`` devices; one of them may be -1 (the rest).

    Raises:
      UserError: sizes that are not positive (or -1), both -1, or that do not multiply to
        ``num_devices``, naming them.
    """
    for name, size in (("data", data), ("fsdp", fsdp)):
        if size != -1 and size < 1:
            raise UserError(f"parallel.{name} must be -1 (the rest) or >= 1, got {size}")
    if data == -1 and fsdp == -1:
        raise UserError("at most one of parallel.data and parallel.fsdp may be -1")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if num_devices % known:
            raise UserError(
                f"the {num_devices} devices do not split into a mesh axis of size {known}"
            )
        data, fsdp = (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
    if data * fsdp != num_devices:
        raise UserError(
            f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, but {num_devices} "
            "are used"
        )
    return data, fsdp


def make_mesh(num_devices: int | None = None, *, data: int = -1, fsdp: int = 1) -> Mesh:
    """A ('data', 'fsdp') mesh over the first ``num_devices`` devices (all by default).

    Args:
      num_devices: devices to use (None or -1: all, over all processes).
      data, fsdp: the axis sizes; one may be -1 (the devices left over).
    """
    available = jax.device_count()
    num_devices = available if num_devices in (None, -1) else num_devices
    if not 1 <= num_devices <= available:
        raise UserError(f"num_devices must be in 1..{available}, got {num_devices}")
    if jax.process_count() > 1 and num_devices != available:
        raise UserError(
            f"a multi-process run uses all {available} devices; got num_devices={num_devices}"
        )
    shape = mesh_shape(num_devices, data, fsdp)
    # Auto axes: the compiler propagates the batch sharding through the vmapped shards.
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh(
        shape, (DATA_AXIS, FSDP_AXIS), axis_types=(auto, auto), devices=jax.devices()[:num_devices]
    )


def fsdp_partition_spec(
    shape: Sequence[int], fsdp_size: int, min_size: int = DEFAULT_FSDP_MIN_SIZE
) -> PartitionSpec:
    """How an array of ``shape`` is laid out under fsdp: sharded over 'fsdp' or replicated.

    An array with at least two axes and ``min_size`` elements is sharded along its last axis
    whose length ``fsdp_size`` divides (for a conv kernel [kh, kw, C_in, C_out], C_out);
    anything else, and everything when ``fsdp_size`` is 1, is replicated (``PartitionSpec()``).
    The same rule lays out a parameter, its EMA and Adam's moments alike, since they share
    its shape.
    """
    if fsdp_size == 1 or len(shape) < 2 or math.prod(shape) < min_size:
        return PartitionSpec()
    for axis in reversed(range(len(shape))):
        if shape[axis] % fsdp_size == 0:
            return PartitionSpec(*(FSDP_AXIS if a == axis else None for a in range(len(shape))))
    return PartitionSpec()


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Places states and batches on devices and compiles steps, in 'jit' or 'pmap' mode.

    Attributes:
      mode: 'jit' or 'pmap'.
      mesh: the devices, with axes 'data' and optionally 'fsdp' (for 'pmap', the local
        devices of one process and no fsdp).
      fsdp_min_size: arrays with fewer elements stay replicated (see
        :func:`fsdp_partition_spec`).
    """

    mode: str
    mesh: Mesh
    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"parallel mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "pmap" and jax.process_count() > 1:
            raise UserError("pmap mode runs on one process; use mode='jit' for multi-host")
        if self.mode == "pmap" and self.fsdp_size > 1:
            raise UserError(
                f"pmap mode replicates the parameters; fsdp={self.fsdp_size} needs mode='jit'"
            )
        if self.fsdp_min_size < 1:
            raise UserError(f"fsdp_min_size must be >= 1, got {self.fsdp_min_size}")

    @property
    def num_shards(self) -> int:
        """Data shards of a global batch: one per device."""
        return self.mesh.devices.size

    @property
    def fsdp_size(self) -> int:
        """Devices each fsdp-sharded array is spread over (1: everything replicated)."""
        return dict(self.mesh.shape).get(FSDP_AXIS, 1)

    @property
    def _batch_axes(self) -> tuple[str, ...]:
        return tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in self.mesh.axis_names)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_sharding(self) -> NamedSharding:
        """Axis 0 split over every device of the mesh."""
        return NamedSharding(self.mesh, PartitionSpec(self._batch_axes))

    def state_sharding(self, tree: PyTree) -> PyTree:
        """A sharding per leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``) for 'jit' mode:
        :func:`fsdp_partition_spec` of its shape over this mesh."""
        return jax.tree.map(
            lambda x: NamedSharding(
                self.mesh, fsdp_partition_spec(np.shape(x), self.fsdp_size, self.fsdp_min_size)
            ),
            tree,
        )

    def check_batch_size(self, global_batch_size: int) -> None:
        """Raise UserError unless the global batch splits evenly over the devices."""
        if global_batch_size % self.num_shards:
            raise UserError(
                f"the global batch size {global_batch_size} is not divisible by the "
                f"{self.num_shards} devices"
            )

    def process_batch_slot(self) -> tuple[int, int]:
        """(slot, count): this process holds rows ``[slot * b, (slot + 1) * b)`` of every
        global batch sharded over the mesh, ``b = batch // count``, ``count`` the number of
        processes. What the data pipeline's ``process_index`` must be, so that the global
        batch is the pipeline's batches concatenated in slot order."""
        count = jax.process_count()
        if count == 1:
            return 0, 1
        rows = self.num_shards * count  # any batch size divisible by both works
        b = rows // count
        spans = {
            (index[0].start or 0, rows if index[0].stop is None else index[0].stop)
            for index in self.batch_sharding.addressable_devices_indices_map((rows,)).values()
            if index is not None
        }
        lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
        if hi - lo != b or lo % b or sum(e - s for s, e in spans) != b:
            raise UserError(
                f"process {jax.process_index()}'s devices do not hold one contiguous block of "
                "the batch; build the mesh with make_mesh"
            )
        return lo // b, count

    def put_state(self, state: PyTree) -> PyTree:
        """A host or device state onto the devices: laid out by :meth:`state_sharding` (stacked
        for pmap). Always new buffers, since the train step donates its state."""
        if self.mode == "pmap":
            n, stacked = self.num_shards, NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
            return jax.tree.map(
                lambda x: jax.device_put(jnp.broadcast_to(x, (n, *jnp.shape(x))), stacked), state
            )
        return _put(state, self.state_sharding(state))

    def get_state(self, state: PyTree) -> PyTree:
        """The state without the pmap device axis (for checkpoints and evaluation)."""
        if self.mode == "pmap":
            # The first device's copy (all are equal). Indexing the stacked array (x[0]) would
            # run a program over every device, with a cross-device gather, for each leaf.
            return jax.tree.map(lambda x: x.addressable_shards[0].data[0], state)
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
        sharding = self._stacked_batch_sharding if stacked else self.batch_sharding
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
        )

    @property
    def _stacked_batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(None, self._batch_axes))

    def compile_train_step(
        self, step_fn: Callable, steps_per_dispatch: int = 1, state: PyTree | None = None
    ) -> Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, dict]]:
        """Compile ``step_fn(state, batch, key, *, num_shards, axis_name) -> (state, metrics)``.

        With ``steps_per_dispatch > 1`` the batch carries a leading axis of that many steps
        (``put_batch(..., stacked=True)``) and the metrics come back stacked.
        The state argument is donated.

        Args:
          step_fn: the step (see above).
          steps_per_dispatch: steps per call.
          state: the state (arrays or ``jax.ShapeDtypeStruct``), whose shapes give its
            layout in 'jit' mode (:meth:`state_sharding`); may be None only when nothing is
            fsdp-sharded (everything replicated).
        """
        if steps_per_dispatch < 1:
            raise UserError(f"steps_per_dispatch must be at least 1, got {steps_per_dispatch}")
        if self.mode == "pmap":
            one = functools.partial(step_fn, num_shards=1, axis_name=DATA_AXIS)
        else:
            one = functools.partial(step_fn, num_shards=self.num_shards, axis_name=None)

        run: Callable[..., Any] = one
        if steps_per_dispatch > 1:
            # Unrolled on CPUs: XLA:CPU leaves the convolutions of a loop body's backward pass in
            # a form its fast (Eigen/YNNPACK) kernels do not take, about 10x slower.
            unroll = self.mesh.devices.flat[0].platform == "cpu"

            def scanned(state, batches, key):
                return jax.lax.scan(lambda s, b: one(s, b, key), state, batches, unroll=unroll)

            run = scanned

        if self.mode == "pmap":
            return jax.pmap(
                run,
                axis_name=DATA_AXIS,
                in_axes=(0, 0, None),
                devices=list(self.mesh.devices.flat),
                donate_argnums=(0,),
            )
        state_sharding = self._tree_sharding(state)
        batch_sharding = (
            self._stacked_batch_sharding if steps_per_dispatch > 1 else self.batch_sharding
        )
        return jax.jit(
            run,
            in_shardings=(state_sharding, batch_sharding, self.replicated),
            out_shardings=(state_sharding, self.replicated),
            donate_argnums=(0,),
        )

    def _tree_sharding(self, tree: PyTree | None) -> Any:
        if tree is not None:
            return self.state_sharding(tree)
        if self.fsdp_size > 1:
            raise UserError("with fsdp > 1, pass the state (or its shapes) to lay it out")
        return self.replicated

    def compile_eval_step(self, eval_fn: Callable, params: PyTree | None = None) -> Callable:
        """Compile ``eval_fn(params, batch, key) -> per-example pytree``.

        Evaluation always runs as one jitted program over the mesh (in both modes), the
        parameters laid out as by :meth:`put_params` (``params``, arrays or shapes, gives
        the layout; None: replicated). The per-example outputs come back as replicated global
        arrays ``[B]``.
        """
        return jax.jit(
            eval_fn,
            in_shardings=(self._tree_sharding(params), self.batch_sharding, self.replicated),
            out_shardings=self.replicated,
        )

    def put_params(self, params: PyTree) -> PyTree:
        """Parameters (without a device axis) onto the mesh for evaluation, laid out by
        :meth:`state_sharding` (replicated unless fsdp shards them)."""
        return _put(params, self.state_sharding(params))


def _is_global(x: Any) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _put(tree: PyTree, shardings: PyTree) -> PyTree:
    """``tree`` as new arrays with ``shardings``, from host arrays, single-process device
    arrays, or (multi-process) global arrays."""
    if jax.process_count() == 1:
        # Copy first: device_put returns an array already in place as it is.
        return jax.device_put(jax.tree.map(jnp.copy, tree), shardings)

    # Each process holds the whole value of a host (or local) leaf: every process passes the
    # same one, as after the same initialisation or restore.
    def to_global(x, sharding):
        if _is_global(x):
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    tree = jax.tree.map(to_global, tree, shardings)
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def to_host(tree: PyTree) -> PyTree:
    """Arrays to numpy: the whole value of each, also of arrays sharded over other processes
    (gathered; a collective that every process must call)."""

    def fetch(x):
        if _is_global(x) and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)


__all__ = [
    "DATA_AXIS",
    "DEFAULT_FSDP_MIN_SIZE",
    "FSDP_AXIS",
    "MODES",
    "DataParallel",
    "fsdp_partition_spec",
    "initialize_distributed",
    "make_mesh",
    "mesh_shape",
    "to_host",
]
