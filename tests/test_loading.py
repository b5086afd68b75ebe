"""vdm_jax.load_run: a trained run's model and parameters from its workdir alone."""

import json
import logging
import os

import jax
import numpy as np
import pytest

import vdm_jax
from vdm_jax.errors import UserError


def _snapshot(path):
    """Every file under ``path`` with its size and modification time."""
    stats = (os.stat(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    names = (os.path.join(d, f) for d, _, files in os.walk(path) for f in files)
    return sorted((n, s.st_size, s.st_mtime_ns) for n, s in zip(names, stats, strict=True))


@pytest.mark.slow
def test_load_run_reproduces_the_runs_own_eval_bound(digits_smoke_run, caplog):
    workdir, _ = digits_smoke_run
    before = _snapshot(workdir)
    with caplog.at_level(logging.WARNING):
        run = vdm_jax.load_run(workdir)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # no orbax warnings
    assert (run.info.vocab_size, run.info.image_shape, run.step) == (17, (8, 8, 1), 4)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    own = [r for r in records if r["step"] == 4 and "test/bpd" in r][-1]
    # The same key, batches and parameters as the run's final evaluation (on 8 devices there).
    result = vdm_jax.evaluate_bpd(run.model, run.variables, run.eval_batches(), run.eval_key)
    assert result.num_examples == own["test/num_examples"] == 297
    np.testing.assert_allclose(result.bpd, own["test/bpd"], rtol=1e-5)

    raw = vdm_jax.load_run(workdir, step=2, params="params")
    assert raw.step == 2
    first = lambda v: jax.tree.leaves(v)[0]  # noqa: E731
    assert not np.array_equal(first(raw.variables), first(run.variables))
    assert _snapshot(workdir) == before  # read-only


@pytest.mark.slow
def test_load_run_bad_input(digits_smoke_run, tmp_path):
    workdir, _ = digits_smoke_run
    with pytest.raises(UserError, match=f"workdir {tmp_path} holds no config.json: train first"):
        vdm_jax.load_run(tmp_path)
    with pytest.raises(UserError, match=r"no checkpoint for step 3 in .*; steps: \[2, 4\]"):
        vdm_jax.load_run(workdir, step=3)
    with pytest.raises(UserError, match="params must be 'ema' or 'params', got 'raw'"):
        vdm_jax.load_run(workdir, params="raw")
    (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(UserError, match=f"no checkpoint in {tmp_path / 'checkpoints'}"):
        vdm_jax.load_run(tmp_path)
