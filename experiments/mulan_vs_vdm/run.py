"""MuLAN against VDM (learned linear and monotonic schedules) at equal steps and equal network.

    python experiments/mulan_vs_vdm/run.py --workdir runs/mulan_vs_vdm \
        --images IMAGES --json experiments/mulan_vs_vdm/results.json \
        --plots experiments/mulan_vs_vdm
    python experiments/mulan_vs_vdm/run.py --smoke --workdir /tmp/mulan_smoke --images IMAGES

The protocol (see README.md), for each data set of ``--datasets`` (``digits``; ``folder``:
the 32x32 RGB images of ``--images``, a folder ``root/{train,test}/<class>/*.png``, of which
``--num_train`` training and ``--num_test`` test images, each drawn without replacement with
seed 0, are linked into ``WORKDIR/data``) and each model of ``--models`` (of ``config.py``:
``linear``, ``monotonic``, ``mulan``; all three by default), one after another in this process:

1. Train ``config.py``'s config for ``--steps`` steps (``trainer.train_and_evaluate``, the
   command line's training) in ``WORKDIR/<data set>/<model>``. The run evaluates its EMA
   parameters on the test split at a third, two thirds and the end (the VLB, one draw of t,
   noise and latent per image, ± its standard error) and keeps those checkpoints.
2. At each of those checkpoints: the test bound again with ``dense_vlb`` at K =
   ``--num_draws`` stratified noise levels per image (the same bound, a smaller standard
   error), MuLAN's with its latent KL, over the same test images.
3. Speed: after the three trainings of a data set, the three train steps timed back to back,
   ``--rounds`` rounds of ``--timed_steps`` steps each (models in turn within a round), on
   batches of the training images; steps/s per model and its ratio to the linear VDM's in the
   same round (median over rounds). The trainer's own steps/s is recorded too.
4. MuLAN's learned schedule (final EMA parameters, the latent at the encoder's mean for
   ``--plot_images`` test images): gamma(t) of a few pixels of each image beside the VDM runs'
   gamma(t) (``<plots>/schedules_<data set>.png``), and gamma(t = 0.5) over each image's
   pixels, as a map and a histogram (``<plots>/gamma_half_<data set>.png``), with its spread
   over pixels in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # `python experiments/mulan_vs_vdm/run.py` from a checkout
    sys.path.insert(0, _ROOT)

from experiments import common  # noqa: E402

STUDY = "mulan_vs_vdm"
DATASETS = ("digits", "folder")
MODELS = ("linear", "monotonic", "mulan")


def study_config(dataset: str, model: str, steps: int | None, smoke: bool, data: str | None):
    """``config.py``'s config for ``dataset`` and ``model`` (``data``: the folder's subset)."""
    options = ([str(steps)] if steps else []) + (["smoke"] if smoke else [])
    arg = ",".join([dataset, model, *options])
    config = common.load_config(STUDY, arg)
    if dataset == "folder":
        config.data.data_dir = data
    return config


def write_subset(images: str, data: str, num_train: int, num_test: int, seed: int = 0) -> None:
    """Links ``num_train`` training and ``num_test`` test images of the folder ``images``,
    each drawn without replacement with ``seed``, into the new folder ``data``."""
    import numpy as np

    from vdm_jax.errors import UserError
    from vdm_jax.training import sources

    for split, count in (("train", num_train), ("test", num_test)):
        source = sources.folder_source(images, split)
        if len(source) < count:
            raise UserError(f"{images!r} holds {len(source)} {split} images; asked for {count}")
        if source.info.image_shape != (32, 32, 3):
            raise UserError(f"{images!r} holds images of shape {source.info.image_shape}")
        drawn = np.sort(np.random.default_rng(seed).choice(len(source), count, replace=False))
        for i in drawn:
            path = source.files[i]
            link = os.path.join(data, split, os.path.relpath(path, os.path.join(images, split)))
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.abspath(path), link)


def parameter_counts(run) -> dict[str, int]:
    """Parameters of a loaded run: in all, and per top-level module (score network, schedule,
    MuLAN's encoder)."""
    import jax

    params = run.variables["params"]
    counts = {name: sum(x.size for x in jax.tree.leaves(tree)) for name, tree in params.items()}
    return {"total": sum(counts.values()), **counts}


def train(config, workdir: str) -> dict:
    """Trains ``config`` in the new folder ``workdir``; the test bounds it logged, its
    steps/s and wall time."""
    from vdm_jax.training import trainer

    if os.path.exists(workdir):  # a resumed run would not train what is reported
        raise SystemExit(f"{workdir} exists; give a new --workdir")
    start = time.time()
    trainer.train_and_evaluate(config, workdir)
    seconds = time.time() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "test/bpd" in r]
    rates = [r["steps_per_sec"] for r in records if "steps_per_sec" in r]
    return {
        "train_seconds": seconds,
        "trainer_steps_per_sec": rates[-1] if rates else None,
        "vlb": [
            {
                "step": r["step"],
                "bpd": r["test/bpd"],
                "bpd_stderr": r["test/bpd_stderr"],
                "latent_bpd": r.get("test/latent_bpd"),
                "num_examples": r["test/num_examples"],
            }
            for r in evals
        ],
    }


def dense_bound(workdir: str, step: int, num_draws: int, seed: int = 0) -> dict:
    """``dense_vlb`` at K = ``num_draws`` of a run's EMA parameters at ``step`` over its whole
    test split, in bits/dim, ± its standard error (MuLAN's with its latent KL)."""
    import jax
    import numpy as np

    import vdm_jax
    from vdm_jax.models import likelihood

    run = vdm_jax.load_run(workdir, step=step)
    key = jax.random.key(seed)
    accumulator = likelihood.Accumulator("dense_vlb", num_draws)
    start = 0
    for batch in run.eval_batches():
        size = len(batch["image"])
        indices = np.arange(start, start + size)
        estimate = likelihood.dense_vlb(
            run.model, run.variables, {"image": batch["image"]}, key,
            num_draws=num_draws, indices=indices,
        )  # fmt: skip
        accumulator.add(estimate, batch["mask"])
        start += size
    result = accumulator.result(int(np.prod(run.info.image_shape)))
    return {
        "step": run.step,
        "num_draws": num_draws,
        "bpd": result.bpd,
        "bpd_stderr": result.bpd_stderr,
        "num_examples": result.num_examples,
        "terms_bpd": result.terms_bpd,
    }


def time_steps(configs: dict, workdirs: dict, rounds: int, timed_steps: int, seed: int = 0) -> dict:
    """Each config's train step, as the trainer compiles and dispatches it
    (:func:`vdm_jax.training.run_setup.compile_train_step`: guarded, on the run's devices),
    timed back to back from its trained run's last state (in ``workdirs``, by model):
    ``rounds`` rounds, each timing ``timed_steps`` steps of every model in turn (after one
    untimed step each), on batches of its training split. Returns per model the median
    steps/s over rounds and the median of its per-round ratio to the first model's."""
    import jax
    import numpy as np

    from vdm_jax.training import run_setup, sources
    from vdm_jax.training.guard import GuardState

    runners = {}
    for name, config in configs.items():
        setup = run_setup.setup_run(config, workdirs[name], "restore")
        try:
            state = run_setup.restore(setup, need=True).state
        finally:
            setup.close()
        source = sources.make_source(config.data.name, "train", data_dir=config.data.data_dir)
        rng = np.random.default_rng(seed)
        batches = [
            setup.dp.put_batch({"image": np.stack([source[int(i)]["image"] for i in idx])})
            for idx in rng.choice(len(source), (timed_steps, config.training.batch_size))
        ]
        _, step = run_setup.compile_train_step(setup)
        key = jax.random.key(seed)
        carry = setup.dp.put_state((state, GuardState.initial()))
        carry, metrics = step(carry, batches[0], key)  # the trainer's program: a cache hit
        jax.block_until_ready(metrics)
        runners[name] = [step, carry, batches, key]
    rates = {name: [] for name in configs}
    for _ in range(rounds):
        for name, runner in runners.items():
            step, state, batches, key = runner
            start = time.perf_counter()
            for batch in batches:
                state, metrics = step(state, batch, key)
            jax.block_until_ready(metrics)
            rates[name].append(timed_steps / (time.perf_counter() - start))
            runner[1] = state
    first = next(iter(configs))
    return {
        name: {
            "steps_per_sec": statistics.median(r),
            "ratio_to_" + first: statistics.median(
                a / b for a, b in zip(r, rates[first], strict=True)
            ),
            "rounds": r,
        }
        for name, r in rates.items()
    }


def schedule_figures(runs: dict, num_images: int, out_dir: str, dataset: str) -> dict:
    """Plots MuLAN's learned per-pixel schedule of ``num_images`` test images (latent at the
    encoder's mean) beside the VDM runs' schedules; returns gamma(0.5)'s spread over pixels.

    ``runs``: model name -> loaded run (:func:`vdm_jax.load_run`), 'mulan' among them."""
    import jax
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mulan = runs["mulan"]
    model, variables = mulan.model, mulan.variables
    # Jitted: op by op, the encoder and the schedule compile hundreds of small programs.
    mean_latent = jax.jit(lambda v, x: model.apply(v, x, method=model.mean_latent))
    gamma = jax.jit(lambda v, t, c: model.apply(v, t, c, method=model.gamma))
    test = np.concatenate([b["image"][b["mask"]] for b in mulan.eval_batches()])
    # gamma(0.5) of every test image: how much it varies over an image's pixels, and how much
    # each pixel's varies over images (the latent's adaptation to the image).
    c_test = mean_latent(variables, jnp.asarray(test))
    everywhere = gamma(variables, jnp.full((len(test),), 0.5), c_test)
    everywhere = np.asarray(everywhere).reshape(len(test), -1)
    images = test[np.linspace(0, len(test) - 1, num_images).astype(int)]  # across the classes
    c = mean_latent(variables, jnp.asarray(images))
    ts = np.linspace(0.0, 1.0, 101)
    gammas = np.stack(
        [np.asarray(gamma(variables, jnp.full((num_images,), t), c)) for t in ts]
    )  # [T, B, H, W, C]
    flat = gammas.reshape(len(ts), num_images, -1)
    half = flat[50]  # t = 0.5, [B, pixels]
    vdm = {
        name: np.asarray(run.model.apply(run.variables, jnp.asarray(ts), method=run.model.gamma))
        for name, run in runs.items()
        if name != "mulan"
    }

    # A few pixels per image: those of the lowest, median and highest gamma(0.5), and two
    # more; below, each curve less the straight line between MuLAN's fixed endpoints.
    gamma_0, gamma_1 = (float(g) for g in model.apply(variables, method=model.endpoints))
    line = gamma_0 + ts * (gamma_1 - gamma_0)
    fig, axes = plt.subplots(2, num_images, figsize=(3.2 * num_images, 6), squeeze=False)
    for b in range(num_images):
        order = np.argsort(half[b])
        n = len(order)
        for row, offset in enumerate((0.0, line)):
            ax = axes[row, b]
            for rank in (0, n // 4, n // 2, 3 * n // 4, n - 1):
                i = order[rank]
                ax.plot(ts, flat[:, b, i] - offset, lw=1.2, label=f"pixel {i} (rank {rank})")
            for (name, g), style in zip(vdm.items(), ("k--", "k:"), strict=False):
                ax.plot(ts, g - offset, style, lw=1, label=f"VDM {name}")
            ax.set_xlabel("t")
        axes[0, b].set_title(f"test image {b}")
        axes[0, b].legend(fontsize=6)
    axes[0, 0].set_ylabel("gamma(t) = -log SNR")
    axes[1, 0].set_ylabel("gamma(t) - straight line")
    fig.suptitle(
        f"MuLAN's learned per-pixel gamma(t) ({dataset}, step {mulan.step}); pixels ranked by "
        "gamma(0.5)"
    )
    fig.tight_layout()
    schedules_png = os.path.join(out_dir, f"schedules_{dataset}.png")
    fig.savefig(schedules_png, dpi=90)
    plt.close(fig)

    # gamma(0.5) over each image's pixels: the image, its map (mean over channels), a histogram.
    fig, axes = plt.subplots(num_images, 3, figsize=(9, 2.6 * num_images), squeeze=False)
    lo, hi = float(half.min()), float(half.max())
    vocab = mulan.info.vocab_size
    for b in range(num_images):
        image = images[b].astype(np.float32) / (vocab - 1)
        axes[b, 0].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
        axes[b, 0].set_title(f"test image {b}")
        field = gammas[50, b].mean(axis=-1)
        shown = axes[b, 1].imshow(field, vmin=lo, vmax=hi, cmap="viridis")
        axes[b, 1].set_title("gamma(0.5) per pixel (channel mean)")
        fig.colorbar(shown, ax=axes[b, 1])
        axes[b, 2].hist(half[b], bins=30, range=(lo, hi))
        for name, g in vdm.items():
            axes[b, 2].axvline(g[50], color="k", ls="--" if name == "linear" else ":", lw=1)
        axes[b, 2].set_title(f"over {half.shape[1]} values: std {half[b].std():.3f}")
        axes[b, 2].set_xlabel("gamma(0.5)")
        for ax in axes[b, :2]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    half_png = os.path.join(out_dir, f"gamma_half_{dataset}.png")
    fig.savefig(half_png, dpi=80)
    plt.close(fig)
    return {
        "step": mulan.step,
        "num_images": num_images,
        "gamma_half_mean": [float(v) for v in half.mean(axis=1)],
        "gamma_half_std_over_pixels": [float(v) for v in half.std(axis=1)],
        "gamma_half_min": [float(v) for v in half.min(axis=1)],
        "gamma_half_max": [float(v) for v in half.max(axis=1)],
        "all_test_images": {
            "num_images": len(test),
            "mean_std_over_pixels": float(everywhere.std(axis=1).mean()),
            "mean_std_over_images": float(everywhere.std(axis=0).mean()),
            "min": float(everywhere.min()),
            "max": float(everywhere.max()),
        },
        "vdm_gamma_half": {name: float(g[50]) for name, g in vdm.items()},
        "plots": [os.path.basename(schedules_png), os.path.basename(half_png)],
    }


def run_dataset(dataset: str, args) -> dict:
    """The protocol for one data set: trains, bounds, timings and plots."""
    import vdm_jax

    data = os.path.join(args.workdir, "data") if dataset == "folder" else None
    models = args.models.split(",")
    configs = {m: study_config(dataset, m, args.steps, args.smoke, data) for m in models}
    workdirs = {m: os.path.join(args.workdir, dataset, m) for m in models}
    results = {"models": {}}
    for model, config in configs.items():
        workdir = workdirs[model]
        figures = train(config, workdir)
        steps_evaluated = [e["step"] for e in figures["vlb"]]
        figures["dense_vlb"] = [dense_bound(workdir, s, args.num_draws) for s in steps_evaluated]
        final = vdm_jax.load_run(workdir)
        figures["parameters"] = parameter_counts(final)
        results["models"][model] = figures
        last, dense = figures["vlb"][-1], figures["dense_vlb"][-1]
        print(
            f"{dataset} {model}: {figures['parameters']['total']} parameters; step "
            f"{last['step']}: vlb {last['bpd']:.4f} +- {last['bpd_stderr']:.4f}, dense_vlb "
            f"{dense['bpd']:.4f} +- {dense['bpd_stderr']:.4f} bits/dim; "
            f"{figures['train_seconds']:.0f} s",
            flush=True,
        )
    results["speed"] = time_steps(configs, workdirs, args.rounds, args.timed_steps)
    print(f"{dataset} speed: {json.dumps(results['speed'])}", flush=True)
    runs = {m: vdm_jax.load_run(workdirs[m]) for m in models}
    results["mulan_schedule"] = schedule_figures(runs, args.plot_images, args.plots, dataset)
    c = configs["linear"]
    results["settings"] = {
        "steps": c.training.num_train_steps,
        "batch_size": c.training.batch_size,
        "n_layer": c.model.n_layer,
        "n_embd": c.model.n_embd,
        "learning_rate": c.optimizer.learning_rate,
        "ema_decay": c.optimizer.ema_decay,
    }
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, help="a new folder for the runs")
    p.add_argument("--datasets", default=",".join(DATASETS), help="digits, folder or both")
    p.add_argument("--models", default=",".join(MODELS), help="linear first, mulan among them")
    p.add_argument("--images", default=None, help="folder: root/{train,test}/<class>/*.png")
    p.add_argument("--num_train", type=int, default=10_000, help="folder: training images")
    p.add_argument("--num_test", type=int, default=300, help="folder: test images")
    p.add_argument("--steps", type=int, default=None, help="training steps (config.py's)")
    p.add_argument("--num_draws", type=int, default=8, help="K of the dense_vlb bound")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the back-to-back timing")
    p.add_argument("--timed_steps", type=int, default=5, help="steps per model per round")
    p.add_argument("--plot_images", type=int, default=4, help="test images in the plots")
    p.add_argument("--plots", default=None, help="folder of the PNGs (default: --workdir)")
    p.add_argument(
        "--smoke", action="store_true", help="the smoke models, a few steps each, on one device"
    )
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    datasets = args.datasets.split(",")
    if set(datasets) - set(DATASETS):
        p.error(f"--datasets: choose from {DATASETS}, got {args.datasets!r}")
    models = args.models.split(",")
    if set(models) - set(MODELS) or models[0] != "linear" or "mulan" not in models:
        p.error(f"--models: linear first, then mulan and/or monotonic; got {args.models!r}")
    if "folder" in datasets and not args.images:
        p.error("the folder data set needs --images (experiments/equal_steps/make_images.py)")
    args.plots = args.plots or args.workdir
    os.makedirs(args.plots, exist_ok=True)
    if "folder" in datasets:
        write_subset(args.images, os.path.join(args.workdir, "data"), args.num_train,
                     args.num_test)  # fmt: skip
    results = {"environment": common.environment(), "load_at_start": os.getloadavg(),
               "args": vars(args), "datasets": {}}  # fmt: skip
    for dataset in datasets:
        results["datasets"][dataset] = run_dataset(dataset, args)
        results["load_at_end_" + dataset] = os.getloadavg()
        if args.json:  # after each data set, so a later failure keeps the first's figures
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
