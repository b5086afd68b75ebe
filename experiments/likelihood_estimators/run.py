"""Every likelihood estimator on two models: figure, standard error and cost for K = 1, 4, 16.

    python experiments/likelihood_estimators/run.py --workdir runs/estimators
    python experiments/likelihood_estimators/run.py --smoke --workdir /tmp/estimators_smoke

The models: ``digits``, the bundled digits config trained by the README's main command
(``WORKDIR/digits``; trained here when that folder holds no run), and ``authors``, the
original code's checkpoint ``tests/fixtures/authors_vdm/scalar`` imported (``--mode=import``)
onto a folder of its 16 evaluation images (``WORKDIR/authors``). On the first
``--digits-examples`` / ``--authors-examples`` images of each test split, each estimator of
:mod:`vdm_jax.models.likelihood` runs as one batch: ``vlb`` (K = 1), ``dense_vlb`` and
``discrete`` (T = 1000) with K noise levels per image, ``ode`` and ``ode_iw`` with K draws of
z_0 (``--num-probes`` Hutchinson probes per draw). ``ode`` and ``ode_iw`` at one K are two
combinations of the same K per-draw bounds (the mean, and -log mean exp(-b)): one pass
(:func:`~vdm_jax.models.likelihood.ode_iw`) gives both, at one cost. Each row: the figure in
bits/dim, its standard error (over the images), the mean per-image spread of the K draws, the
network evaluations per image, the wall-clock and the CPU (user + system of this process)
seconds per image of the compiled pass (compilation timed apart) and the machine's load
average around it. Also ``ode`` and ``ode_iw`` at K' = 1, 2, 4, ..., K from the first K'
draws of the largest ODE pass (draw k of an image does not depend on K, nor on the batch),
their costs K'/K of that pass's (scaled, not timed). Prints the tables and writes them to
``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # `python experiments/likelihood_estimators/run.py` from a checkout
    sys.path.insert(0, _ROOT)

from experiments import common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(_ROOT, "tests", "fixtures", "authors_vdm", "scalar")
MODELS = ("digits", "authors")


def prepare_digits(workdir: str, smoke: bool) -> str:
    """The trained digits run in ``workdir/digits``, trained here if the folder holds none."""
    from vdm_jax.training import trainer

    path = os.path.join(workdir, "digits")
    if not os.path.isfile(os.path.join(path, "config.json")):
        config = common.load_config("likelihood_estimators", "digits,smoke" if smoke else "digits")
        trainer.train_and_evaluate(config, path)
    return path


def prepare_authors(workdir: str) -> str:
    """The fixture's checkpoint imported into ``workdir/authors``, on an image folder of its
    16 evaluation images (both splits), written to ``workdir/authors_images``."""
    import numpy as np
    from PIL import Image

    from vdm_jax.training import importer

    path, images = os.path.join(workdir, "authors"), os.path.join(workdir, "authors_images")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    pixels = np.load(os.path.join(FIXTURE, "expected.npz"))["images"]
    for split in ("train", "test"):
        os.makedirs(os.path.join(images, split, "0"), exist_ok=True)
        for i, image in enumerate(pixels):
            Image.fromarray(image).save(os.path.join(images, split, "0", f"{i:02d}.png"))
    config = common.load_config("likelihood_estimators", "authors")
    config.data.data_dir = images
    importer.import_original(config, path, os.path.join(FIXTURE, "checkpoints-0"))
    return path


def first_examples(run, n: int) -> dict:
    """The first ``n`` examples of the run's test split as one batch: 'image' (and 'label'
    when the model takes labels), 'index' 0..n-1."""
    import numpy as np

    images, labels = [], []
    for batch in run.eval_batches(split="test"):
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    images, labels = np.concatenate(images), np.concatenate(labels)
    if n > len(images):
        raise SystemExit(f"asked for {n} examples; the test split has {len(images)}")
    batch = {"image": images[:n], "index": np.arange(n, dtype=np.int32)}
    if run.config.model.num_classes > 0:
        batch["label"] = labels[:n]
    return batch


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far: unlike wall-clock seconds, they do
    not count the time the process waits (other jobs' turns, a SIGSTOP)."""
    times = os.times()
    return times.user + times.system


def timed_pass(name: str, run, batch: dict, num_draws: int, options: dict):
    """One compiled pass of the estimator over the batch: (Estimate on the host, cost), the
    cost a dict of the compile seconds, the run's wall-clock and CPU seconds and the load
    averages before and after."""
    import jax

    from vdm_jax.models import likelihood

    entry = likelihood.get_estimator(name)
    fields = {k: v for k, v in batch.items() if k != "index"}
    draws = {"num_draws": num_draws} if entry.takes_num_draws else {}
    args = (run.variables, fields, run.eval_key)
    kwargs = {"indices": batch["index"], **draws, **options}
    start = time.perf_counter()
    compiled = entry.fn.lower(run.model, *args, **kwargs).compile()  # the model is static
    compile_s = time.perf_counter() - start
    load, start, start_cpu = os.getloadavg()[0], time.perf_counter(), cpu_seconds()
    out = jax.block_until_ready(compiled(*args, indices=batch["index"]))
    cost = {"compile_seconds": compile_s, "seconds": time.perf_counter() - start,
            "cpu_seconds": cpu_seconds() - start_cpu, "load_before": load,
            "load_after": os.getloadavg()[0]}  # fmt: skip
    return jax.device_get(out), cost


def figures(name, num_draws, est, num_dims, cost, *, scale: float = 1.0) -> dict:
    """A row of the table from an Estimate over the batch (every example real) and its pass's
    cost (see :func:`timed_pass`); ``scale`` multiplies the pass's seconds, for a row read
    from part of a pass's draws."""
    from vdm_jax.models import likelihood

    acc = likelihood.Accumulator(name, num_draws)
    acc.add(est)
    res = acc.result(num_dims)
    n = res.num_examples
    return {
        "estimator": name, "K": num_draws, "bpd": res.bpd, "bpd_stderr": res.bpd_stderr,
        "spread_bpd": None if math.isnan(res.spread_bpd) else res.spread_bpd,
        "nfe_per_image": res.nfe, "num_examples": n, "terms_bpd": res.terms_bpd,
        "seconds_per_image": scale * cost["seconds"] / n,
        "cpu_seconds_per_image": scale * cost["cpu_seconds"] / n,
        "compile_seconds": cost["compile_seconds"],
        "load_before": cost["load_before"], "load_after": cost["load_after"],
    }  # fmt: skip


def first_draws(est, name: str, k: int, num_dims: int):
    """The Estimate of ``name`` ('ode' or 'ode_iw') from the first ``k`` draws of an ODE
    pass's Estimate (an image's j-th draw is the same whatever K); the network evaluations
    scaled by k/K, the terms (which the pass averaged over all K) left out unless k = K."""
    import numpy as np
    from jax.scipy.special import logsumexp

    draws = np.asarray(est.draws)[:, :k]
    if name == "ode_iw":
        nats = math.log(k) - np.asarray(logsumexp(-draws, axis=1))
    else:
        nats = draws.mean(axis=1)
    to_bpd = 1.0 / (num_dims * math.log(2.0))
    spread = draws.std(axis=1, ddof=1) * to_bpd if k > 1 else np.full(len(draws), np.nan)
    num_draws = est.draws.shape[1]
    nfe = np.asarray(est.nfe) * k / num_draws
    terms = est.terms if k == num_draws else {}
    return est._replace(
        nats=nats, bpd=nats * to_bpd, draws=draws, spread=spread, nfe=nfe, terms=terms
    )


def measure(model_name: str, path: str, args) -> dict:
    """Every estimator and K on one model (see the module docstring)."""
    import vdm_jax

    run = vdm_jax.load_run(path)
    n = args.digits_examples if model_name == "digits" else args.authors_examples
    batch = first_examples(run, n)
    num_dims = math.prod(run.info.image_shape)
    ode_options = {"rtol": args.ode_tol, "atol": args.ode_tol, "num_probes": args.num_probes}
    plan = [("vlb", 1, {})]
    plan += [("dense_vlb", k, {}) for k in args.draws]
    plan += [("discrete", k, {"num_steps": args.discrete_steps}) for k in args.draws]
    plan += [("ode_iw", k, ode_options) for k in args.ode_draws]
    rows, largest = [], None
    for name, k, options in plan:
        est, cost = timed_pass(name, run, batch, k, options)
        if name == "ode_iw":
            # The same draws' plain mean is the `ode` estimator at this K, at the same cost.
            rows.append(figures("ode", k, first_draws(est, "ode", k, num_dims), num_dims, cost))
            if largest is None or k > largest[0].draws.shape[1]:
                largest = est, cost
        rows.append(figures(name, k, est, num_dims, cost))
        r = rows[-1]
        if name == "ode_iw":  # to compare draws across passes (the same to the bit)
            r["draws_nats"] = est.draws.tolist()
        print(
            f"{model_name}: {name} K={k}: {r['bpd']:.4f} +- {r['bpd_stderr']:.4f} bits/dim, "
            f"{r['nfe_per_image']:.1f} network evaluations, {r['seconds_per_image']:.4f} s "
            f"({r['cpu_seconds_per_image']:.4f} CPU s) per image (compile "
            f"{cost['compile_seconds']:.1f} s, load {cost['load_before']:.1f}-"
            f"{cost['load_after']:.1f})",
            flush=True,
        )
    derived = []
    if largest is not None:
        est, cost = largest
        num_draws, k = est.draws.shape[1], 1
        while k <= num_draws:
            for name in ("ode", "ode_iw"):
                part = first_draws(est, name, k, num_dims)
                row = figures(name, k, part, num_dims, cost, scale=k / num_draws)
                derived.append({**row, "first_of": num_draws})
            k *= 2
    return {
        "workdir": path, "step": run.step, "image_shape": list(run.info.image_shape),
        "num_examples": n, "num_probes": args.num_probes, "rows": rows, "first_draws": derived,
    }  # fmt: skip


def table(result: dict) -> str:
    """The measured rows as a markdown table, one per model, and the rows read from the
    first K' draws of its largest ODE pass."""
    lines = []
    for model_name, m in result["models"].items():
        lines.append(
            f"\n{model_name} (step {m['step']}, {m['num_examples']} test images "
            f"{'x'.join(map(str, m['image_shape']))}, {m['num_probes']} probe(s) per ODE draw):"
        )
        derived = m["first_draws"]
        intro = "" if not derived else (
            f"From the first K' draws of the K = {derived[0]['first_of']} pass (its seconds "
            f"scaled by K'/{derived[0]['first_of']}, not timed):"
        )  # fmt: skip
        for title, rows in (("", m["rows"]), (intro, derived)):
            if not rows:
                continue
            lines += [
                *(["", title] if title else []),
                "",
                "| estimator | K | bits/dim | standard error | per-image spread | "
                "network evaluations / image | seconds / image | CPU seconds / image | "
                "compile s | load |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            ]
            for r in rows:
                spread = "-" if r["spread_bpd"] is None else f"{r['spread_bpd']:.4f}"
                lines.append(
                    f"| {r['estimator']} | {r['K']} | {r['bpd']:.4f} | {r['bpd_stderr']:.4f} | "
                    f"{spread} | {r['nfe_per_image']:.1f} | {r['seconds_per_image']:.4f} | "
                    f"{r['cpu_seconds_per_image']:.4f} | {r['compile_seconds']:.1f} | "
                    f"{r['load_before']:.1f}-{r['load_after']:.1f} |"
                )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, help="the runs' folder (reused when they exist)")
    p.add_argument("--models", default=",".join(MODELS), help="digits, authors or both")
    p.add_argument("--digits-examples", type=int, default=64, help="first N digits test images")
    p.add_argument("--authors-examples", type=int, default=16, help="first N fixture images")
    p.add_argument("--draws", default=None, help="K of dense_vlb and discrete (1,4,16; smoke 2)")
    p.add_argument("--ode-draws", default=None,
                   help="K of ode and ode_iw, '' for none (1,4,16; smoke 2)")  # fmt: skip
    p.add_argument("--discrete-steps", type=int, default=1000, help="T of the discrete bound")
    p.add_argument("--ode-tol", type=float, default=1e-5, help="the ODE solve's rtol and atol")
    p.add_argument("--num-probes", type=int, default=1, help="Hutchinson probes per ODE draw")
    p.add_argument(
        "--smoke", action="store_true", help="the digits smoke model, 2 images, K = 2, tol 1e-2"
    )
    p.add_argument("--json", default=os.path.join(HERE, "results.json"), help="write it here")
    args = p.parse_args(argv)
    models = args.models.split(",")
    if set(models) - set(MODELS):
        p.error(f"--models: choose from {MODELS}, got {args.models!r}")
    default = "2" if args.smoke else "1,4,16"
    args.draws, args.ode_draws = (
        [int(k) for k in (default if value is None else value).split(",") if k]
        for value in (args.draws, args.ode_draws)
    )
    if args.smoke:
        args.digits_examples = args.authors_examples = 2
        args.ode_tol = 1e-2
    result = {"environment": common.environment(), "load_start": os.getloadavg()[0],
              "settings": {k: v for k, v in vars(args).items() if k != "json"},
              "models": {}}  # fmt: skip
    start = time.time()
    for model_name in models:
        if model_name == "digits":
            path = prepare_digits(args.workdir, args.smoke)
        else:
            path = prepare_authors(args.workdir)
        result["models"][model_name] = measure(model_name, path, args)
    result["seconds"], result["load_end"] = time.time() - start, os.getloadavg()[0]
    print(table(result), flush=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
