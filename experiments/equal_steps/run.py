"""Ours against the original code at equal training steps, on a folder of 32x32 RGB images.

    python experiments/equal_steps/run.py --images IMAGES --steps 300 \
        --original /tmp/original_vdm --json equal_steps.json
    python experiments/equal_steps/run.py --images IMAGES --sides ours     # without their code

The protocol (see README.md):

1. ``IMAGES`` is a folder ``root/{train,test}/<class>/*.png`` of 32x32 RGB images (the
   ``folder`` source of :mod:`vdm_jax.training.sources`; ``make_images.py`` makes one offline).
   Its subset, written as symbolic links into ``--data``: 10,000 training images drawn without
   replacement with seed 0 (``numpy.random.default_rng(0)``) and the first 1,000 test images
   in the folder source's sorted order (class folders sorted, then file names).
2. Both models: 4 blocks x 32 channels, Fourier features, attention in the middle only, a
   learned linear schedule from [-13.3, 5], continuous time, V = 256, dropout 0.1; batch 32;
   AdamW (lr 2e-4, b1 0.9, b2 0.99, weight decay 0.01) with 100 warm-up steps, then constant;
   a parameter moving average of decay ``config.optimizer.ema_decay``.
3. Ours: ``trainer.train_and_evaluate`` with ``config.py`` (the command line's training).
   Theirs: their ``model_vdm.py`` from ``--original`` (a checkout of google-research/vdm),
   trained by :class:`experiments.original.OriginalVDM` (their loss, optimiser and EMA as their
   ``experiment.py`` runs them) on batches of the same training images (each epoch a
   permutation drawn with seed 0; ours are shuffled by our pipeline with config.seed = 0).
4. Each side's moving-average parameters after ``--steps`` updates: the test bound in
   bits/dim over one exact pass of the 1,000 test images (one draw of t and noise per image),
   with its standard error, and the training wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # `python experiments/equal_steps/run.py` from a checkout
    sys.path.insert(0, _ROOT)

from experiments import common  # noqa: E402

NUM_TRAIN = 10_000
NUM_TEST = 1_000
SIDES = ("ours", "original")


def _load_config(steps: int, data: str, smoke: bool = False):
    """This study's ``config.py`` for ``steps`` steps on the subset folder ``data`` (at the
    smoke model's size if ``smoke``)."""
    config = common.load_config("equal_steps", f"{steps},smoke" if smoke else str(steps))
    config.data.data_dir = data
    return config


def write_subset(images: str, data: str, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST):
    """Links the protocol's subset of the folder ``images`` into the new folder ``data``:
    ``num_train`` training images drawn with seed 0, the first ``num_test`` test images."""
    import numpy as np

    from vdm_jax.errors import UserError
    from vdm_jax.training import sources

    train = sources.folder_source(images, "train")
    test = sources.folder_source(images, "test")
    if len(train) < num_train or len(test) < num_test:
        raise UserError(
            f"{images!r} holds {len(train)} training and {len(test)} test images; the protocol "
            f"needs at least {num_train} and {num_test}"
        )
    if train.info.image_shape != (32, 32, 3):
        raise UserError(f"{images!r} holds images of shape {train.info.image_shape}, not 32x32x3")
    drawn = np.sort(np.random.default_rng(0).choice(len(train), num_train, replace=False))
    for split, source, indices in (("train", train, drawn), ("test", test, range(num_test))):
        for i in indices:
            path = source.files[i]
            link = os.path.join(data, split, os.path.relpath(path, os.path.join(images, split)))
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.abspath(path), link)


def _arrays(data: str, split: str):
    import numpy as np

    from vdm_jax.training import sources

    source = sources.folder_source(data, split)
    return np.stack([source[i]["image"] for i in range(len(source))])


def run_ours(args) -> dict:
    from vdm_jax.training import trainer

    config = _load_config(args.steps, args.data, args.smoke)
    workdir = os.path.join(args.workdir, "ours")
    start = time.time()
    trainer.train_and_evaluate(config, workdir)
    seconds = time.time() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    final = next(r for r in reversed(records) if "test/bpd" in r)
    train = [r for r in records if "bpd" in r and "test/bpd" not in r]
    return {
        "test_bpd": final["test/bpd"],
        "test_bpd_stderr": final["test/bpd_stderr"],
        "num_test": final["test/num_examples"],
        "last_train_bpd": train[-1]["bpd"] if train else None,
        "seconds": seconds,
        "workdir": workdir,
    }


def run_original(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import original

    config = _load_config(args.steps, args.data, args.smoke)
    theirs = original.OriginalVDM(
        original.load(args.original),
        n_layer=config.model.n_layer,
        n_embd=config.model.n_embd,
        dropout_rate=config.model.dropout_rate,
        learning_rate=config.optimizer.learning_rate,
        warmup_steps=config.optimizer.warmup_steps,
        ema_rate=config.optimizer.ema_decay,
    )
    train, test = _arrays(args.data, "train"), _arrays(args.data, "test")
    batch = config.training.batch_size
    rng = np.random.default_rng(config.seed)
    order = np.zeros(0, int)
    state = theirs.init_state(config.seed)
    step = jax.jit(theirs.train_step, donate_argnums=0)
    key = jax.random.key(config.seed)
    start = time.time()
    for i in range(args.steps):
        if len(order) < batch:  # a new epoch
            order = np.concatenate([order, rng.permutation(len(train))])
        indices, order = order[:batch], order[batch:]
        state, bpd = step(state, jnp.asarray(train[indices]), key)
        if (i + 1) % config.training.log_every == 0 or i + 1 == args.steps:
            print(f"original: step {i + 1} train bpd {float(bpd):.4f}", flush=True)
    last_train_bpd = float(bpd)
    seconds = time.time() - start
    evaluate = jax.jit(theirs.eval_bpd)
    eval_key = jax.random.key(config.seed + 1)
    per_image = np.concatenate(
        [
            np.asarray(
                evaluate(
                    state["ema_params"],
                    jnp.asarray(test[s : s + 100]),
                    jax.random.fold_in(eval_key, s),
                )
            )
            for s in range(0, len(test), 100)
        ]
    )
    return {
        "test_bpd": float(per_image.mean()),
        "test_bpd_stderr": float(per_image.std(ddof=1) / np.sqrt(len(per_image))),
        "num_test": len(per_image),
        "last_train_bpd": last_train_bpd,
        "seconds": seconds,
    }


def main(argv=None) -> dict:
    from experiments import original

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", help="a folder root/{train,test}/<class>/*.png of 32x32 RGB images")
    p.add_argument("--data", default=None, help="the protocol's subset (default: under --workdir)")
    p.add_argument("--workdir", default="/tmp/vdm_equal_steps", help="a folder for the runs")
    p.add_argument("--steps", type=int, default=300, help="training steps of each side")
    p.add_argument("--sides", default=",".join(SIDES), help="ours, original or both")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--smoke", action="store_true", help="the smoke model's size: seconds")
    original.add_flag(p)
    args = p.parse_args(argv)
    sides = args.sides.split(",")
    if set(sides) - set(SIDES):
        p.error(f"--sides: choose from {SIDES}, got {args.sides!r}")
    if "original" in sides and original.find(args.original) is None:
        p.error(
            f"no model_vdm.py at {args.original!r}: pass --original with a checkout of "
            "https://github.com/google-research/vdm, or --sides ours"
        )
    args.data = args.data or os.path.join(args.workdir, "data")
    if not os.path.isdir(args.data):
        if not args.images:
            p.error(f"{args.data} does not exist: give --images, the folder to draw it from")
        write_subset(args.images, args.data)
    results = {"steps": args.steps, "data": args.data, "sides": {}}
    for side in sides:
        results["sides"][side] = run_ours(args) if side == "ours" else run_original(args)
        print(json.dumps({side: results["sides"][side]}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
