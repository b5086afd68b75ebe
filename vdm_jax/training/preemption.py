"""Preemption: a SIGTERM becomes a stop step that every process of the job agrees on."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

__all__ = ["PreemptionWatcher"]


class PreemptionWatcher:
    """Turns a preemption notice (SIGTERM) into a stop step that every process agrees on.

    :meth:`install` replaces the SIGTERM handler with one that only records the signal;
    :meth:`should_stop` then says when to save and exit; :meth:`close` (or leaving the
    ``with`` block) puts the previous handler back. Under ``jax.distributed`` with its
    preemption service (the default), JAX itself catches SIGTERM and agrees on a step with
    every process (``reached_preemption_sync_point``), so no Python handler replaces JAX's;
    without it, :meth:`should_stop` gathers every process's flag. Every process calls
    :meth:`should_stop` at the same steps, e.g. ``ckpt.save(..., force=w.should_stop(step))``.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._received = False
        self._use_jax_sync = False
        self._logged = False

    def install(self) -> PreemptionWatcher:
        """Starts watching (idempotent; from the main thread, as Python requires); returns self."""
        self._use_jax_sync = jax.distributed.is_initialized() and bool(
            jax.config.jax_enable_preemption_service  # type: ignore[attr-defined]
        )
        if not self._use_jax_sync and not self._previous:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError(
                    "PreemptionWatcher.install() must be called from the main thread"
                )
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self._received = True

    @property
    def received(self) -> bool:
        """Whether this process has received one of the signals since :meth:`install`."""
        return self._received

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save and stop at ``step`` (the same on every process)."""
        if self._use_jax_sync:
            stop = bool(multihost_utils.reached_preemption_sync_point(int(step)))
        elif jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.int32(self._received))
            stop = bool(np.max(flags))
        else:
            stop = self._received
        if stop and not self._logged:
            self._logged = True
            logging.warning("Preemption notice received: stopping at step %d.", int(step))
        return stop

    def close(self) -> None:
        """Puts back the signal handlers that were installed before (idempotent)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionWatcher:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
