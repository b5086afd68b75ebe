"""The divergence guard: a non-finite loss term, gradient norm or parameter stops training, or
(if asked) the update is skipped.

The guard's state travels with the train state through the compiled step, so checking costs
no host round trip: it records the first fatal step, which terms were non-finite there (two
bits per term: NaN, +-Inf), the current run of bad updates and how many were skipped. The
host reads it only at the steps where it logs, saves, evaluates or samples, before it does
so, so no checkpoint holds a diverged state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

__all__ = ["DivergenceGuard", "GuardState", "TrainingDivergedError"]

_NO_STEP = -1


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss term, gradient norm or parameter.

    The message names the first bad step and the terms; nothing after the last good
    checkpoint was saved.
    """


@flax.struct.dataclass
class GuardState:
    """What the guard carries from step to step (int32 scalars).

    Attributes:
      fatal_step: the step of the first fatal update, or -1.
      fatal_terms: bit mask of its non-finite terms (:meth:`DivergenceGuard.describe`).
      fatal_streak_start: the first step of the run of bad updates that ended in it.
      streak_start: the first step of the current run of bad updates.
      consecutive: the length of the current run of bad updates.
      skipped: bad updates skipped so far.
    """

    fatal_step: jax.Array
    fatal_terms: jax.Array
    fatal_streak_start: jax.Array
    streak_start: jax.Array
    consecutive: jax.Array
    skipped: jax.Array

    @classmethod
    def initial(cls) -> GuardState:
        """No bad update yet."""
        zero = jnp.zeros((), jnp.int32)
        return cls(jnp.full((), _NO_STEP, jnp.int32), zero, zero, zero, zero, zero)


class DivergenceGuard:
    """Wraps a train step to watch it, and reads what it saw.

    An update is *bad* when a metric (other than the learning rate) or a new parameter is
    NaN or Inf. With ``skip == 0`` the first bad update is fatal. With ``skip > 0`` a bad
    update is replaced by the old state (only the step advances) and counted; the
    ``skip + 1``-th bad update in a row is fatal.
    """

    def __init__(self, skip: int = 0):
        self.skip = skip
        self._names: list[str] = []  # what the bits refer to, known once the step is traced

    def wrap(self, step_fn: Callable) -> Callable:
        """``step_fn(state, batch, key, **kw) -> (state, metrics)`` as a step on
        ``((state, GuardState), batch, key, **kw)``."""
        skip = self.skip

        def guarded(carry, batch, key, **kwargs):
            state, guard = carry
            new_state, metrics = step_fn(state, batch, key, **kwargs)
            names = sorted(k for k in metrics if k != "lr")
            self._names = [*names, "params"]
            bits = jnp.zeros((), jnp.int32)
            for i, name in enumerate(names):
                bits |= jnp.where(jnp.any(jnp.isnan(metrics[name])), 1 << (2 * i), 0)
                bits |= jnp.where(jnp.any(jnp.isinf(metrics[name])), 2 << (2 * i), 0)
            # One fused pass: x * 0 is NaN exactly where x is NaN or +-Inf.
            probe = sum(jnp.sum(x * 0) for x in jax.tree.leaves(new_state.params))
            bits |= jnp.where(jnp.isnan(probe), 1 << (2 * len(names)), 0)
            bad = bits != 0
            step = new_state.step
            consecutive = jnp.where(bad, guard.consecutive + 1, 0)
            streak_start = jnp.where(bad & (guard.consecutive == 0), step, guard.streak_start)
            fatal = bad & (consecutive > skip) & (guard.fatal_step == _NO_STEP)
            guard = GuardState(
                fatal_step=jnp.where(fatal, step, guard.fatal_step),
                fatal_terms=jnp.where(fatal, bits, guard.fatal_terms),
                fatal_streak_start=jnp.where(fatal, streak_start, guard.fatal_streak_start),
                streak_start=streak_start,
                consecutive=consecutive,
                skipped=guard.skipped + (bad & (skip > 0)).astype(jnp.int32),
            )
            if skip > 0:
                kept = jax.tree.map(lambda new, old: jnp.where(bad, old, new), new_state, state)
                new_state = kept.replace(step=step)
            return (new_state, guard), metrics

        return guarded

    def describe(self, bits: int) -> str:
        """The non-finite terms a bit mask names, e.g. ``bpd=nan, grad_norm=nan``."""
        parts = []
        for i, name in enumerate(self._names):
            nan, inf = (bits >> (2 * i)) & 1, (bits >> (2 * i + 1)) & 1
            if name == "params" and nan:
                parts.append("params (non-finite after the update)")
            elif nan or inf:
                kinds = [k for k, on in (("nan", nan), ("inf", inf)) if on]
                parts.append(f"{name}={'/'.join(kinds)}")
        return ", ".join(parts) or "unknown terms"

    def check(self, guard: Any, kept: str) -> None:
        """Raises :class:`TrainingDivergedError` if the host copy of a :class:`GuardState`
        recorded a fatal step; ``kept`` says what was saved (for the message)."""
        fatal = int(guard.fatal_step)
        if fatal == _NO_STEP:
            return
        terms = self.describe(int(guard.fatal_terms))
        if self.skip:
            first = int(guard.fatal_streak_start)
            what = (
                f"{fatal - first + 1} non-finite updates in a row (steps {first} to {fatal}), "
                f"more than training.skip_nonfinite_updates={self.skip} allows; at step "
                f"{fatal} non-finite {terms}"
            )
        else:
            what = f"non-finite {terms}"
        raise TrainingDivergedError(
            f"training diverged at step {fatal}: {what}. Nothing from step {fatal} on was "
            f"saved; {kept}. Lower optimizer.learning_rate, set optimizer.clip_norm, or set "
            "training.skip_nonfinite_updates to skip such updates."
        )
