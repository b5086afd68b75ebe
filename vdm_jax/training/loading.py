"""A trained run in your own code: :func:`load_run` (also ``vdm_jax.load_run``).

::

    run = vdm_jax.load_run("runs/digits")  # the latest checkpoint's EMA parameters
    terms = vdm_jax.models.evaluation.bound_terms(run.model, run.variables, batch, key)
    images = vdm_jax.ddim_sample(run.model, run.variables, key,
                                 shape=(16, *run.info.image_shape), num_steps=50)

It reads the workdir only (``config.json``, ``data_info.json`` and the parameters of one
checkpoint, not the optimizer state nor the data position) and writes nothing there; the
arrays land on the first local device, whatever devices the run was trained on.
"""

from __future__ import annotations

import contextlib
import functools
import logging as pylogging
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from vdm_jax.errors import UserError
from vdm_jax.models.mulan import MuLAN
from vdm_jax.models.vdm import VDM
from vdm_jax.training import checkpoint, pipeline, run_files, sources, steps
from vdm_jax.training.builders import model_from_config
from vdm_jax.training.run_setup import EVAL_STREAM
from vdm_jax.training.schema import check_config, with_defaults

__all__ = ["LoadedRun", "load_run"]


class LoadedRun(NamedTuple):
    """A trained model with its variables and the data it models.

    Attributes:
      model: the :class:`~vdm_jax.models.vdm.VDM` the run trained.
      variables: ``{'params': ...}`` (the EMA parameters, or the raw ones: see
        :func:`load_run`), on the first local device.
      info: the data's image shape ``(H, W, C)``, vocabulary size (pixel values
        ``0..vocab_size-1``) and number of classes.
      config: the run's config (its ``config.json`` over the base config's defaults).
      step: the checkpoint's step (optimizer updates done).
    """

    model: VDM | MuLAN
    variables: dict[str, Any]
    info: sources.DatasetInfo
    config: ml_collections.ConfigDict
    step: int

    @property
    def eval_key(self) -> jax.Array:
        """The key of the run's own evaluation: batch i of :meth:`eval_batches` used
        ``fold_in(eval_key, i)``, as :func:`vdm_jax.models.evaluation.evaluate_bpd` does."""
        return jax.random.fold_in(jax.random.key(self.config.seed), EVAL_STREAM)

    def eval_batches(
        self, split: str | None = None, batch_size: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """One exact pass over a split of the run's data set, as the run evaluated it:
        batches of ``batch_size`` (default ``config.eval.batch_size``) with 'image' (uint8
        ``[b, H, W, C]``), 'label' and 'mask' (the last batch padded, its padding masked).
        ``split`` defaults to ``config.eval.split``. Needs the data (``config.data``)."""
        d, size = self.config.data, batch_size or self.config.eval.batch_size
        source = sources.make_source(d.name, split or self.config.eval.split, data_dir=d.data_dir)
        for i, batch in enumerate(pipeline.make_eval_iterator(source, global_batch_size=size)):
            yield dict(batch, mask=np.arange(i * size, (i + 1) * size) < len(source))


class _WithoutReadOnlyNote(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_reader() -> Iterator[None]:
    """orbax notes at WARNING level that a reader's folder is read-only: that is the point."""
    logger, note = pylogging.getLogger("absl"), _WithoutReadOnlyNote()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


def load_run(workdir: str | os.PathLike, step: int | None = None, params: str = "ema") -> LoadedRun:
    """The model of a training run and its parameters, from the run's workdir alone.

    Args:
      workdir: the run's folder (local or ``gs://``).
      step: the checkpoint to load; None for the latest complete one.
      params: ``'ema'``, the moving average of the parameters (what the run evaluated and
        sampled with), or ``'params'``, the optimizer's current ones.

    Returns:
      :class:`LoadedRun`. Nothing in ``workdir`` is written or changed.

    Raises:
      UserError: no run in ``workdir`` (no folder, no ``config.json`` or no checkpoint), a
        ``step`` that was not saved, or ``params`` not ``'ema'`` or ``'params'``.
    """
    if params not in ("ema", "params"):
        raise UserError(f"params must be 'ema' or 'params', got {params!r}")
    path = run_files.resolve(workdir)
    config = with_defaults(run_files.read_config(path))
    check_config(config)
    saved = run_files.read_data_info(path)
    if saved is None:  # a run written before data_info.json: the data set tells
        info = sources.dataset_info(config.data.name, data_dir=config.data.data_dir)
    else:
        info = sources.DatasetInfo(
            name=saved["name"], image_shape=tuple(saved["image_shape"]),
            vocab_size=int(saved["vocab_size"]), num_classes=int(saved["num_classes"]),
        )  # fmt: skip
    model = model_from_config(config, info.vocab_size, info.image_shape)
    shapes = steps.param_shapes(model, info.image_shape, config.model.num_classes > 0)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    name = "ema_params" if params == "ema" else "params"
    on_device = functools.partial(jax.ShapeDtypeStruct, sharding=device)
    target = {name: jax.tree.map(lambda s: on_device(s.shape, s.dtype), shapes)}
    directory = os.path.join(path, "checkpoints")
    with (
        _quiet_reader(),
        checkpoint.Checkpointer(
            directory, save_interval_steps=1, max_to_keep=None, read_only=True
        ) as reader,
    ):
        restored = reader.restore(target, step, partial=True)
    if restored is None:
        raise UserError(f"no checkpoint in {directory}: {path} holds no trained run yet")
    return LoadedRun(
        model=model, variables={"params": restored.state[name]}, info=info, config=config,
        step=restored.step,
    )  # fmt: skip
