"""The ELBO against a weighted objective on the digits, at equal training steps.

    python benchmarks/objectives.py --steps 2000 --workdir /tmp/objectives --json out.json

Trains the digits config (vdm_jax/configs/digits.py) once per variant for the same number of
steps, then reports for each: the test-split VLB in bits/dim (one exact pass, EMA
parameters), the digits Frechet distance of ``--samples`` ancestral samples to the training
split (a small digits classifier's features: NOT comparable with published FID), the training
wall time, and the same distance for the held-out test split itself (the floor a perfect model
would reach with that many images, up to sample size).

Variants: ``elbo`` (the VDM objective, learned linear schedule, eps-prediction), ``sigmoid``
(sigmoid weighting, adaptive noise levels, eps-prediction) and ``sigmoid_v`` (the same with
v-prediction). Every number is measured by this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

VARIANTS = {
    "elbo": {},
    "sigmoid": {"objective.weighting": "sigmoid", "objective.noise_levels": "adaptive"},
    "sigmoid_v": {
        "objective.weighting": "sigmoid",
        "objective.noise_levels": "adaptive",
        "model.parameterization": "v",
    },
}


def _config(steps: int, overrides: dict, bias: float):
    from vdm_jax.configs import digits

    config = digits.get_config()
    config.training.num_train_steps = steps
    config.optimizer.decay_steps = max(steps - config.optimizer.warmup_steps, 1)
    config.training.checkpoint_every = steps
    config.training.log_every = max(steps // 4, 1)
    config.objective.bias = bias
    for name, value in overrides.items():
        section, field = name.split(".")
        config[section][field] = value
    return config


def run(args) -> dict:
    import jax
    import numpy as np

    from vdm_jax import sampling
    from vdm_jax.training import features, trainer

    extractor = features.digits_features(args.cache_dir)
    test_images, _ = features._split_arrays("test")
    results = {
        "steps": args.steps,
        "samples": args.samples,
        "sampling_steps": args.sampling_steps,
        "sigmoid_bias": args.bias,
        "classifier_test_accuracy": extractor.test_accuracy,
        "test_split_frechet": extractor.distance(test_images),
        "variants": {},
    }
    for name in args.variants.split(","):
        config = _config(args.steps, VARIANTS[name], args.bias)
        workdir = os.path.join(args.workdir, name)
        start = time.time()
        trainer.train_and_evaluate(config, workdir)
        train_seconds = time.time() - start
        evaluation = trainer.evaluate(config, workdir)
        restored = trainer.restore_state(config, workdir)
        model = trainer.build_model(config, 17)
        images = sampling.ancestral_sample(
            model,
            {"params": jax.device_get(restored.state.ema_params)},
            jax.random.key(args.seed),
            shape=(args.samples, 8, 8, 1),
            num_steps=args.sampling_steps,
        )
        results["variants"][name] = {
            "overrides": VARIANTS[name],
            "test_bpd": float(evaluation["test/bpd"]),
            "test_bpd_stderr": float(evaluation["test/bpd_stderr"]),
            "frechet": extractor.distance(np.asarray(images)),
            "train_seconds": train_seconds,
        }
        print(json.dumps({name: results["variants"][name]}), flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--sampling-steps", type=int, default=200)
    p.add_argument("--bias", type=float, default=2.0, help="the sigmoid weighting's bias b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--workdir", default="/tmp/vdm_objectives")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
