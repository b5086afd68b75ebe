"""The ELBO against a weighted objective on the digits, at equal training steps.

    python experiments/objectives/run.py --steps 2000 --json out.json   # the README's figures
    python experiments/objectives/run.py --smoke                        # a tiny model, 2 steps each

Trains the study's config (``config.py``: the bundled digits config, one variant of the
objective each) once per variant for the same number of steps, each in a fresh workdir, then
reports for each: the test-split VLB in bits/dim (the final evaluation of the run: one exact
pass, EMA parameters) with its standard error, the
digits Frechet distance of ``--samples`` ancestral samples to the training split (what
``--mode=sample`` reports: a small digits classifier's features, NOT comparable with published
FID), and the training wall time; and the same distance for the held-out test split itself
(the floor a perfect model would reach with that many images, up to sample size).

Variants (``config.py``): ``elbo`` (the VDM objective, learned linear schedule,
eps-prediction), ``sigmoid`` (sigmoid weighting with b = 2, adaptive noise levels,
eps-prediction) and ``sigmoid_v`` (the same with v-prediction). Every number is measured by
this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # `python experiments/objectives/run.py` from a checkout
    sys.path.insert(0, _ROOT)

from experiments import common  # noqa: E402
from experiments.objectives.config import VARIANTS  # noqa: E402

SMOKE = {"steps": 2, "samples": 16, "sampling_steps": 2}


def _last(workdir: str, field: str) -> dict:
    """The last record of ``workdir/metrics.jsonl`` that has ``field``."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if field in line]
    return next(r for r in reversed(records) if field in r)


def run(args) -> dict:
    import numpy as np

    from vdm_jax.training import features, sources, trainer

    if args.cache_dir:
        os.environ[features.CACHE_ENV] = args.cache_dir
    extractor = features.digits_features(args.cache_dir)
    test = sources.digits_source("test")
    test_images = np.stack([test[i]["image"] for i in range(len(test))])
    results = {
        "steps": args.steps,
        "samples": args.samples,
        "sampling_steps": args.sampling_steps,
        "sigmoid_bias": VARIANTS["sigmoid"]["objective.bias"],
        "smoke": args.smoke,
        "classifier_test_accuracy": extractor.test_accuracy,
        "test_split_frechet": extractor.distance(test_images),
        "variants": {},
    }
    root = args.workdir or tempfile.mkdtemp(prefix="vdm_objectives_")
    for name in args.variants.split(","):
        arg = f"{name},{args.steps}" + (",smoke" if args.smoke else "")
        config = common.load_config("objectives", arg)
        workdir = os.path.join(root, name)
        if os.path.exists(workdir):  # a resumed run would not train for the time measured
            raise SystemExit(f"{workdir} exists; give a new --workdir")
        start = time.time()
        trainer.train_and_evaluate(config, workdir)
        train_seconds = time.time() - start
        evaluation = _last(workdir, "test/bpd")
        config.sampling.sampler = "ancestral"
        config.sampling.num_samples = args.samples
        config.sampling.sampling_steps = args.sampling_steps
        trainer.sample(config, workdir)  # reports the digits Frechet distance
        results["variants"][name] = {
            "overrides": VARIANTS[name],
            "test_bpd": evaluation["test/bpd"],
            "test_bpd_stderr": evaluation["test/bpd_stderr"],
            "frechet": _last(workdir, "frechet_digits")["frechet_digits"],
            "train_seconds": train_seconds,
        }
        print(json.dumps({name: results["variants"][name]}), flush=True)
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--sampling-steps", type=int, default=200)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="the digits smoke model, 2 steps each")
    p.add_argument("--workdir", default=None, help="a new folder (default: a temporary one)")
    p.add_argument("--cache-dir", default=None, help="the digits classifier's cache folder")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return results


if __name__ == "__main__":
    main()
