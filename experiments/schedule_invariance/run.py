"""Learned against linear schedules: the diffusion term's invariance and its estimator's variance.

    python experiments/schedule_invariance/run.py --workdir runs/schedules --json schedules.json
    python experiments/schedule_invariance/run.py --smoke --workdir /tmp/schedules_smoke

In continuous time the diffusion term of the bound depends on the noise schedule only through
its endpoints gamma(0) and gamma(1) (the paper, section 5.1 and appendix E): the schedule's
shape changes only the variance of the one-sample Monte Carlo estimator, which the monotonic
schedule's shape can learn to lower (appendix I.2, ``model.variance_gradient``).

For each schedule kind of ``config.py`` (``monotonic``: the learned monotonic network with the
variance gradient; ``linear``: the learned linear schedule), this trains the digits config for
``--steps`` steps in ``WORKDIR/<kind>``, then, with the run's EMA parameters and every test
image, computes the diffusion loss at the midpoints of ``--bins`` time bins under the run's own
schedule and under the linear schedule with the same endpoints, the same noise for both
(:func:`vdm_jax.training.report_data.diffusion_loss_by_time`). It reports, in bits/dim: each one's
expected diffusion term E_t[L(t)] (the midpoint rule) and the standard deviation of the
one-sample estimator (t ~ U(0, 1), one noise draw per image), the run's own test bound, and
writes the per-t plot ``WORKDIR/<kind>/loss_by_time.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # `python experiments/schedule_invariance/run.py` from a checkout
    sys.path.insert(0, _ROOT)

from experiments import common  # noqa: E402

KINDS = ("monotonic", "linear")


def measure(workdir: str, bins: int, seed: int = 0) -> dict:
    """The diffusion term under a trained run's schedule and under the linear one with the
    same endpoints, over its test split, and the run's own final test bound."""
    import jax
    import numpy as np

    import vdm_jax
    from vdm_jax.training import report_data, report_render

    run = vdm_jax.load_run(workdir)
    images = np.concatenate([b["image"][b["mask"]] for b in run.eval_batches()])
    key = jax.random.key(seed)
    own, linear = (
        report_data.diffusion_loss_by_time(
            run.model, run.variables, images, key, num_bins=bins, linear=flag
        )
        for flag in (False, True)
    )
    report_render.plot_loss_by_time(own, os.path.join(workdir, "loss_by_time.png"), linear=linear)
    gamma_0, gamma_1 = run.model.apply(run.variables, method="endpoints")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        final = [r for r in map(json.loads, f) if "test/bpd" in r][-1]
    return {
        "step": run.step,
        "gamma_0": float(gamma_0),
        "gamma_1": float(gamma_1),
        "num_images": own.num_images,
        "bins": bins,
        "own_expected": own.expected,
        "linear_expected": linear.expected,
        "own_estimator_std": own.estimator_std,
        "linear_estimator_std": linear.estimator_std,
        "test_bpd": final["test/bpd"],
        "test_bpd_stderr": final["test/bpd_stderr"],
        "test_diffusion_bpd": final["test/diffusion_bpd"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, help="a new folder for the runs")
    p.add_argument("--kinds", default=",".join(KINDS), help="schedule kinds of config.py")
    p.add_argument("--steps", type=int, default=None, help="training steps (config.py's: 1500)")
    p.add_argument("--bins", type=int, default=32, help="time bins of the per-t loss")
    p.add_argument("--smoke", action="store_true", help="the digits smoke model, 2 steps each")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    kinds = args.kinds.split(",")
    if set(kinds) - set(KINDS):
        p.error(f"--kinds: choose from {KINDS}, got {args.kinds!r}")
    if args.smoke:
        args.bins = min(args.bins, 4)
    from vdm_jax.training import trainer

    results = {"bins": args.bins, "kinds": {}}
    for kind in kinds:
        arg = ",".join([kind] + ([str(args.steps)] if args.steps else []) + (
            ["smoke"] if args.smoke else []))  # fmt: skip
        config = common.load_config("schedule_invariance", arg)
        workdir = os.path.join(args.workdir, kind)
        if os.path.exists(workdir):  # a resumed run would not train what is reported
            p.error(f"{workdir} exists; give a new --workdir")
        start = time.time()
        trainer.train_and_evaluate(config, workdir)
        figures = {"train_seconds": time.time() - start, **measure(workdir, args.bins)}
        results["kinds"][kind] = figures
        print(
            f"{kind}: step {figures['step']}, endpoints [{figures['gamma_0']:.3f}, "
            f"{figures['gamma_1']:.3f}]; diffusion term {figures['own_expected']:.4f} bits/dim "
            f"(linear, same endpoints: {figures['linear_expected']:.4f}); estimator std "
            f"{figures['own_estimator_std']:.4f} (linear: {figures['linear_estimator_std']:.4f}); "
            f"test bound {figures['test_bpd']:.4f} +- {figures['test_bpd_stderr']:.4f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
