"""Few-step samplers against the probability-flow solution: RMS distance vs network evaluations.

    python experiments/few_step/run.py --workdir RUN [--checkpoint CKPT] --plot few_step.png
    python experiments/few_step/run.py --smoke --plot /tmp/few_step.png    # a tiny untrained model
    python experiments/few_step/run.py --from_json a.json --from_json b.json --plot both.png

For each model (``--workdir``: a vdm_jax training run, e.g. of this study's ``config.py``, the
EMA parameters of its latest checkpoint or of the one at ``--step``;
``--checkpoint``: an original-code checkpoint folder, read by
:func:`vdm_jax.pretrained.load_original_checkpoint` with its EMA parameters; each flag may be
repeated, one plot panel per model), ``--batch`` prior latents z_1 ~ N(0, I) are drawn from
one key, and every sampler of :mod:`vdm_jax.models.sampling` starts from those same z_1:

- ``ancestral`` (stochastic), ``ddim``, ``dpm_solver`` (DPM-Solver++(2M)) and ``dpm_solver_sde``
  (its stochastic variant), each at every ``--nfe`` number of network evaluations (one per
  step for all four);
- the reference: :func:`vdm_jax.models.ode.solve_probability_flow` from the same z_1 at
  ``rtol = atol = --tolerance`` (1e-6). It is solved once more at ``--check_tolerance`` (1e-5)
  and the distance between the two solutions is printed, an estimate of the reference's own
  error.

The distance compared is that of the final latents, before the decoder's discretisation:
RMS over the batch and every pixel of (z_0 - z_0_reference) / alpha_0, in data units (the data
lie in [-1, 1]; alpha_0 = sqrt(sigmoid(-gamma_0)) is within 3e-4 of 1 for these models). For
the stochastic samplers the distance to the flow solution is not expected to vanish as the
evaluations grow: they sample the data distribution given z_1 rather than follow the flow map.
Each line also gives the share of pixels whose decoded value (the decoder's argmax) differs
from the reference's, and the RMS over the pixels whose values agree: a latent that ends near
the boundary between two values may fall on either side, and each such pixel adds a whole bin
(2 / V) to the RMS.

Prints one line per (model, sampler, NFE), and writes the plot (log-log, RMS against NFE, one
line per sampler, one panel per model, the goal 1e-2 as a horizontal line) and, with
``--json``, the figures; ``--from_json`` adds the models of earlier ``--json`` files to the
plot without measuring them again.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from vdm_jax.maths import diffusion
from vdm_jax.models import ode, sampling
from vdm_jax.models.unet import ScoreUNet
from vdm_jax.models.vdm import VDM, make_schedule

#: name -> (sampler, its keyword arguments, stochastic?). Each takes one evaluation per step.
SAMPLERS = {
    "ancestral": (sampling.ancestral_sample, {}, True),
    "ddim": (sampling.ddim_sample, {}, False),
    "dpm_solver": (sampling.dpm_solver_sample, {}, False),
    "dpm_solver_sde": (sampling.dpm_solver_sample, {"stochastic": True}, True),
}
GOAL = 1e-2
SMOKE = dict(nfe="2,4", batch=2, tolerance=1e-3, check_tolerance=0.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", action="append", default=[], help="a vdm_jax training run")
    p.add_argument(
        "--step", type=int, default=None, help="the --workdir runs' checkpoint (default: latest)"
    )
    p.add_argument(
        "--checkpoint", action="append", default=[], help="an original-code checkpoint folder"
    )
    p.add_argument("--nfe", default="5,10,20,50,100,200", help="network evaluations per sampler")
    p.add_argument("--batch", type=int, default=16, help="prior latents per model")
    p.add_argument("--tolerance", type=float, default=1e-6, help="the reference's rtol = atol")
    p.add_argument(
        "--check_tolerance", type=float, default=1e-5, help="a second reference's (0: none)"
    )
    p.add_argument("--max_steps", type=int, default=8192, help="the reference's most steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write the PNG here")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument(
        "--from_json",
        action="append",
        default=[],
        help="plot the models of this earlier --json output instead of measuring",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny untrained model, seconds")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    elif not (args.workdir or args.checkpoint or args.from_json):
        p.error(
            "name at least one model: --workdir RUN or --checkpoint CKPT (or --smoke, or "
            "--from_json FILE)"
        )
    try:
        args.nfe = sorted({int(n) for n in args.nfe.split(",") if n})
    except ValueError:
        p.error(f"--nfe must be comma-separated integers, got {args.nfe!r}")
    if not args.nfe or args.nfe[0] < 1:
        p.error(f"--nfe must hold positive integers, got {args.nfe}")
    return args


# ------------------------------------------------------------------------------ the models


def workdir_model(workdir: str, step: int | None = None):
    """(name, model, variables, image shape, num_classes) of a training run's checkpoint at
    ``step`` (default: the latest; its EMA parameters, :func:`vdm_jax.load_run`)."""
    import vdm_jax

    run = vdm_jax.load_run(workdir, step=step)
    name = f"{run.info.name} {'x'.join(map(str, run.info.image_shape))}, step {run.step}"
    return name, run.model, run.variables, tuple(run.info.image_shape), run.config.model.num_classes


def checkpoint_model(path: str):
    """(name, model, variables, image shape, 0) of an original-code checkpoint (EMA)."""
    from vdm_jax import pretrained

    model, variables = pretrained.load_original_checkpoint(path, params="ema")
    checkpoint = pretrained.read_original_checkpoint(path)
    channels = checkpoint.architecture.image_channels
    # The tree holds no image size; their models (and these benchmarks) are 32x32.
    shape = (32, 32, channels)
    folder, last = os.path.split(os.path.normpath(path))
    if last.startswith("checkpoints"):  # their layout: <run>/checkpoints-0
        last = os.path.basename(folder)
    name = f"original-code checkpoint {last}, 32x32x{channels}"
    return name, model, variables, shape, 0


def smoke_model():
    """A tiny untrained model (1 block of 16 channels, 8x8x3)."""
    model = VDM(
        score_net=ScoreUNet(n_layer=1, n_embd=16, dropout_rate=0.0),
        schedule=make_schedule("learned_linear"),
        vocab_size=256,
    )
    shape = (8, 8, 3)
    k_params, k_diffusion = jax.random.split(jax.random.key(0))
    init = jax.jit(functools.partial(model.init, train=False))  # one program, not op by op
    variables = init(
        {"params": k_params, "diffusion": k_diffusion}, jnp.zeros((1, *shape), jnp.uint8)
    )
    return "tiny untrained 8x8x3", model, {"params": variables["params"]}, shape, 0


# ------------------------------------------------------------------------------ measuring


def initial_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The z_1 every sampler of :mod:`vdm_jax.models.sampling` draws from ``key`` (it depends on the
    key alone): a normal draw from the first half of the key's split."""
    return jax.random.normal(jax.random.split(key)[0], shape, jnp.float32)


def rms(a, b, scale: float, where=None) -> float:
    """RMS of (a - b) / scale over every element (or those of the mask ``where``), in float64."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) / scale
    squares = np.square(diff) if where is None else np.square(diff)[where]
    return float(np.sqrt(np.mean(squares))) if squares.size else 0.0


def distances(z_0, images, reference: dict, alpha_0: float) -> dict:
    """The RMS distance of z_0 to the reference, the share of pixels whose decoded value
    differs from the reference's (a latent near the boundary of two values can end on either
    side, each such pixel adding a whole bin to the RMS) and the RMS over the pixels that agree."""
    agree = np.asarray(images) == reference["images"]
    return {
        "rms": rms(z_0, reference["z_0"], alpha_0),
        "decoded_differ": float(1.0 - np.mean(agree)),
        "rms_agreeing": rms(z_0, reference["z_0"], alpha_0, where=agree),
    }


def describe(d: dict) -> str:
    """One line's figures of :func:`distances`."""
    return (
        f"RMS {d['rms']:.3e} | decoded values differ at {d['decoded_differ']:.2%} of pixels | "
        f"RMS where they agree {d['rms_agreeing']:.3e}"
    )


def measure(name, model, variables, image_shape, num_classes, args) -> dict:
    """Every sampler at every NFE against the flow solution, for one model; prints lines."""
    shape = (args.batch, *image_shape)
    key = jax.random.key(args.seed)
    labels = jnp.arange(args.batch) % num_classes if num_classes else None
    z_1 = initial_noise(key, shape)
    gamma_0, _ = model.apply(variables, method="endpoints")
    alpha_0 = float(diffusion.alpha_sigma(gamma_0)[0])

    decode = jax.jit(lambda z: jnp.argmax(model.apply(variables, z, method="decode_log_probs"), -1))
    references = {}
    for tol in (args.tolerance, args.check_tolerance):
        if tol <= 0 or tol in references:
            continue
        t0 = time.perf_counter()
        z_0, nfe = ode.solve_probability_flow(
            model, variables, z_1, labels=labels, rtol=tol, atol=tol, max_steps=args.max_steps
        )
        references[tol] = {
            "z_0": np.asarray(z_0),
            "images": np.asarray(decode(z_0)),
            "nfe_mean": float(np.mean(nfe)),
            "nfe_max": int(np.max(nfe)),
            "seconds": time.perf_counter() - t0,
        }
        print(
            f"{name}: the flow at tolerance {tol:g}: NFE mean {np.mean(nfe):.0f} max "
            f"{np.max(nfe)}, {references[tol]['seconds']:.0f} s",
            flush=True,
        )
    reference = references[args.tolerance]
    check = None
    line = f"{name}: gamma_0 {float(gamma_0):.3f}, alpha_0 {alpha_0:.6f}"
    if args.check_tolerance in references and args.check_tolerance != args.tolerance:
        other = references[args.check_tolerance]
        check = distances(other["z_0"], other["images"], reference, alpha_0)
        line += (
            f"; the flow at tolerance {args.check_tolerance:g} against the reference at "
            f"{args.tolerance:g}: {describe(check)}"
        )
    print(line, flush=True)
    rows = []
    for sampler_name, (sample, kwargs, stochastic) in SAMPLERS.items():
        for nfe in args.nfe:
            images, z_0 = sample(
                model, variables, key, shape=shape, num_steps=nfe, labels=labels,
                return_latent=True, **kwargs,
            )  # fmt: skip
            d = distances(z_0, images, reference, alpha_0)
            kind = "stochastic: not expected to vanish" if stochastic else "deterministic"
            print(
                f"{name} | {sampler_name:14s} | NFE {nfe:4d} | {describe(d)} | {kind}", flush=True
            )
            rows.append({"sampler": sampler_name, "nfe": nfe, **d, "stochastic": stochastic})
    return {
        "name": name,
        "batch": args.batch,
        "image_shape": list(image_shape),
        "gamma_0": float(gamma_0),
        "alpha_0": alpha_0,
        "reference": {
            str(tol): {k: v for k, v in r.items() if k not in ("z_0", "images")}
            for tol, r in references.items()
        },
        "reference_check_rms": check,
        "rows": rows,
    }


def first_nfe_within(rows, sampler: str, goal: float = GOAL) -> int | None:
    """The fewest evaluations at which ``sampler``'s distance is at most ``goal``."""
    hits = [r["nfe"] for r in rows if r["sampler"] == sampler and r["rms"] <= goal]
    return min(hits) if hits else None


def plot(results: list[dict], path: str) -> None:
    """Log-log RMS vs NFE, one panel per model, one line per sampler, the goal as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(results), figsize=(5.0 * len(results), 3.8), squeeze=False, sharey=True
    )
    for ax, result in zip(axes[0], results, strict=True):
        for sampler_name, (_, _, stochastic) in SAMPLERS.items():
            rows = [r for r in result["rows"] if r["sampler"] == sampler_name]
            label = sampler_name + (" (stochastic)" if stochastic else "")
            ax.loglog(
                [r["nfe"] for r in rows],
                [max(r["rms"], 1e-12) for r in rows],
                "--" if stochastic else "-",
                marker="o",
                markersize=3,
                label=label,
            )
        ax.axhline(GOAL, color="grey", linewidth=0.8, linestyle=":", label=f"goal {GOAL:g}")
        ax.set_title(result["name"], fontsize=9)
        nfes = sorted({r["nfe"] for r in result["rows"]})
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_xlabel("network evaluations")
        ax.grid(True, which="major", linewidth=0.3)
    axes[0][0].set_ylabel("RMS of z_0 / alpha_0 to the flow solution")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    models = [smoke_model] if args.smoke else []
    models += [lambda w=w: workdir_model(w, args.step) for w in args.workdir]
    models += [lambda c=c: checkpoint_model(c) for c in args.checkpoint]
    results = []
    for path in args.from_json:
        with open(path) as f:
            results += json.load(f)["models"]
    for load in models:
        name, model, variables, image_shape, num_classes = load()
        results.append(measure(name, model, variables, image_shape, num_classes, args))
        reached = first_nfe_within(results[-1]["rows"], "dpm_solver")
        print(
            f"{name}: DPM-Solver++(2M) within {GOAL:g} "
            + (f"from {reached} evaluations" if reached else f"at none of {args.nfe}"),
            flush=True,
        )
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"environment": common.environment(), "settings": vars(args), "models": results},
                f, indent=2, default=str,
            )  # fmt: skip
    return results


if __name__ == "__main__":
    main()
