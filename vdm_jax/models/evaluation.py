"""Likelihood evaluation: one exact pass over a data set, every example counted once.

A short last batch is padded to the batch size and masked (so the jitted bound compiles
once); padded examples never enter the averages, nothing is dropped or repeated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.errors import UserError
from vdm_jax.models.mulan import MuLAN
from vdm_jax.models.vdm import VLBTerms

__all__ = [
    "BpdAccumulator",
    "EvalResult",
    "MaskedMeans",
    "bound_terms",
    "evaluate_bpd",
    "independent_pixel_bpd",
    "pad_batch",
]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """The bound averaged over a data set, in bits per dimension.

    Attributes:
      bpd: mean of the per-example bound.
      bpd_stderr: its standard error (sample std / sqrt(n)), from the one (t, noise) draw
        per example.
      prior_bpd, reconstruction_bpd, diffusion_bpd: means of the three terms.
      num_examples: how many examples were counted.
      latent_bpd: for a model with an auxiliary latent (MuLAN,
        :class:`~vdm_jax.models.mulan.MuLANTerms`), the mean of the latent's KL term, which
        ``bpd`` includes; None otherwise (and left out of :meth:`as_dict`).
    """

    bpd: float
    bpd_stderr: float
    prior_bpd: float
    reconstruction_bpd: float
    diffusion_bpd: float
    num_examples: int
    latent_bpd: float | None = None

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The fields that have a value as a flat dict, keys prefixed (e.g. 'test/')."""
        return {prefix + k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class MaskedMeans:
    """Running float64 sums of named per-example columns over the examples a mask keeps.

    The sums do not depend on the order or the cut of the batches, up to float64 rounding;
    :meth:`means` and :meth:`stderr` read them.
    """

    def __init__(self) -> None:
        self.count = 0
        self._sums: dict[str, float] = {}
        self._squares: dict[str, float] = {}

    def add(self, columns: Mapping[str, Any], mask: Array | np.ndarray | None = None) -> None:
        """Add a batch: ``columns`` maps names to ``[B]`` values; ``mask`` ``[B]`` bool marks
        the real examples (None: all)."""
        values = {k: np.asarray(v, np.float64) for k, v in columns.items()}
        size = next(iter(values.values())).shape
        mask = np.ones(size, bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != size:
            raise UserError(f"mask has shape {mask.shape}, the batch {size}")
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v[mask].sum())
            self._squares[k] = self._squares.get(k, 0.0) + float(np.square(v[mask]).sum())
        self.count += int(mask.sum())

    def means(self) -> dict[str, float]:
        """The mean of every column over the examples added."""
        if self.count == 0:
            raise UserError("no examples were evaluated: the data set is empty")
        return {k: v / self.count for k, v in self._sums.items()}

    def stderr(self, name: str) -> float:
        """The standard error of column ``name``'s mean: sample std (n - 1) / sqrt(n)."""
        n, mean = self.count, self.means()[name]
        var = max(self._squares[name] / n - mean**2, 0.0) * n / max(n - 1, 1)
        return math.sqrt(var / n)


class BpdAccumulator:
    """The VLB's per-example terms averaged over masked batches; :meth:`result` reads them."""

    def __init__(self):
        self._sums = MaskedMeans()

    def add(self, terms: VLBTerms, mask: Array | np.ndarray | None = None) -> None:
        """Add a batch of per-example terms ``[B]`` (:class:`~vdm_jax.models.vdm.VLBTerms`, or
        :class:`~vdm_jax.models.mulan.MuLANTerms` with the latent's term); ``mask`` ``[B]`` bool
        marks real examples."""
        self._sums.add(terms._asdict(), mask)

    def result(self, num_dims: int) -> EvalResult:
        """Averages over everything added; ``num_dims`` converts nats to bits/dim."""
        mean = self._sums.means()
        to_bpd = 1.0 / (num_dims * math.log(2.0))
        return EvalResult(
            bpd=mean["bpd"],
            bpd_stderr=self._sums.stderr("bpd"),
            prior_bpd=mean["prior"] * to_bpd,
            reconstruction_bpd=mean["reconstruction"] * to_bpd,
            diffusion_bpd=mean["diffusion"] * to_bpd,
            num_examples=self._sums.count,
            latent_bpd=mean["latent"] * to_bpd if "latent" in mean else None,
        )


def pad_batch(batch: Mapping[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    """Pad a batch dict along axis 0 to ``batch_size``, adding or extending a bool 'mask'."""
    size = len(batch["image"])
    if size > batch_size:
        raise UserError(f"batch of {size} examples is larger than the batch size {batch_size}")
    out = {k: np.asarray(v) for k, v in batch.items()}
    out.setdefault("mask", np.ones(size, bool))
    if size < batch_size:
        out = {
            k: np.concatenate([v, np.zeros((batch_size - size, *v.shape[1:]), v.dtype)])
            for k, v in out.items()
        }
    return out


def bound_terms(
    model: Any,
    variables: Any,
    batch: Mapping[str, Array],
    key: Array,
    *,
    num_steps: int | None = None,
) -> Any:
    """Per-example variational bound of one batch, without dropout; pure (jit it as you like).

    Args:
      model: a :class:`~vdm_jax.models.vdm.VDM`, or a :class:`~vdm_jax.models.mulan.MuLAN`
        (unconditional, continuous time: it takes neither labels nor the flag).
      variables: its variables, e.g. ``{'params': ema_params}``.
      batch: 'image' integer ``[B, H, W, C]``, optionally 'label' int ``[B]`` (passed to the
        model when present) and 'conditioning' float ``[B]`` (the augmentation flag, passed
        to a score network with a conditioning input; absent means 0).
      key: the batch's PRNG key (one draw of t and the noise per example; for MuLAN also
        the latent's).
      num_steps: T for the discrete-time bound, 0 for continuous, None for the model's own.

    Returns:
      :class:`~vdm_jax.models.vdm.VLBTerms` (:class:`~vdm_jax.models.mulan.MuLANTerms` for
      MuLAN), each ``[B]``: the terms in nats, the total in bits/dim.
    """
    if isinstance(model, MuLAN):
        return model.apply(
            variables, batch["image"], train=False, num_steps=num_steps, rngs={"diffusion": key}
        )
    # Augmented batches carry the flag whatever the network; only one with the input sees it.
    takes_conditioning = getattr(getattr(model, "score_net", None), "conditioning_input", False)
    conditioning = batch.get("conditioning") if takes_conditioning else None
    extra = {} if conditioning is None else {"conditioning": jnp.asarray(conditioning, jnp.float32)}
    return model.apply(
        variables,
        batch["image"],
        batch.get("label"),
        **extra,
        train=False,
        num_steps=num_steps,
        rngs={"diffusion": key},
    )


@functools.partial(jax.jit, static_argnames=("model", "num_steps"))
def _jitted_bound(model, variables, batch, key, num_steps):
    return bound_terms(model, variables, batch, key, num_steps=num_steps)


def evaluate_bpd(
    model: Any,
    params: Any,
    batches: Iterable[Mapping[str, Any]],
    key: Array,
    *,
    num_steps: int | None = None,
    use_labels: bool = False,
    bound_fn: Callable[[Any, dict[str, Any], Array], VLBTerms] | None = None,
) -> EvalResult:
    """The variational bound over one pass of ``batches``, in bits/dim.

    Args:
      model: a :class:`~vdm_jax.models.vdm.VDM` (or a module with its ``__call__`` signature).
      params: its variables, e.g. ``{'params': ema_params}`` (what ``bound_fn`` takes).
      batches: dicts with 'image' (integer ``[b, H, W, C]``), optionally 'label' ``[b]`` and
        'mask' ``[b]`` (bool, False for padding). Batches shorter than the first are padded.
      key: PRNG key; batch i uses ``fold_in(key, i)``, so the result is reproducible.
      num_steps: T for the discrete-time bound (e.g. 1000), 0 for continuous, None for the
        model's own setting.
      use_labels: pass each batch's 'label' to the model (class-conditional networks).
      bound_fn: ``bound_fn(params, batch, key) -> VLBTerms`` of ``[b]`` arrays, the bound of
        one batch (without its mask); by default :func:`bound_terms` jitted. The training
        system passes the same function compiled for its devices (a global batch sharded
        over a mesh, of which ``batches`` holds this process's rows and the whole mask).

    Returns:
      :class:`EvalResult`.
    """
    if bound_fn is None:

        def bound_fn(params, batch, key):
            return _jitted_bound(model, params, batch, key, num_steps)

    acc = BpdAccumulator()
    batch_size, num_dims = None, None
    for i, batch in enumerate(batches):
        if batch_size is None:
            batch_size = len(batch["image"])
            num_dims = int(np.prod(np.shape(batch["image"])[1:]))
        batch = pad_batch(batch, batch_size)
        mask = batch.pop("mask")
        if not use_labels:
            batch.pop("label", None)
        acc.add(bound_fn(params, batch, jax.random.fold_in(key, i)), mask)
    if num_dims is None:
        raise UserError("no examples were evaluated: the data set is empty")
    return acc.result(num_dims)


def independent_pixel_bpd(
    train_images: np.ndarray, test_images: np.ndarray, vocab_size: int
) -> float:
    """Bits/dim on ``test_images`` of the best model that treats every dimension independently.

    Each dimension (pixel and channel) gets its own categorical over the vocabulary, fitted on
    ``train_images`` with add-one smoothing; the figure is its cross-entropy on the test
    images, a reference that any model of the joint distribution should beat.

    Args:
      train_images, test_images: integer ``[N, H, W, C]``, values in 0..V-1.
      vocab_size: V.
    """
    train_flat = np.asarray(train_images).reshape(len(train_images), -1).astype(np.int64)
    test_flat = np.asarray(test_images).reshape(len(test_images), -1).astype(np.int64)
    dims = train_flat.shape[1]
    counts = np.ones((dims, vocab_size))
    np.add.at(counts, (np.arange(dims)[None, :], train_flat), 1.0)
    log2_probs = np.log2(counts / counts.sum(1, keepdims=True))
    return float(-np.mean(log2_probs[np.arange(dims)[None, :], test_flat]))
