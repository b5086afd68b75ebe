"""The paper's model on one accelerator: one command, one JSON line per figure.

    python benchmarks/gpu.py --original /path/to/google-research-vdm --out gpu.jsonl
    python benchmarks/gpu.py --smoke          # a tiny model on any backend, seconds (CI)

Figures, in this order, each printed as soon as it is measured (so a run stopped by
``--hard_limit`` keeps what it measured):

- ``matmul_peak``: FLOP/s of a large bfloat16 matmul, measured here (the peak fractions'
  denominator).
- for each ``--dtypes`` (bfloat16, float32): the paper's CIFAR-10 model (32 blocks, 128
  channels, 32x32x3, batch 128, the default "plain" formulation: ``jax.nn.dot_product_attention``)
  under jit with the state donated: ``train_images_per_sec``, ``train_peak_fraction``
  (XLA's FLOP count of the step over its time, over the bfloat16 peak), ``train_compile_s``,
  ``train_compiled_peak_bytes`` (XLA's memory analysis) and ``train_device_peak_bytes`` (the
  device's own peak, where it reports one);
- ``original_train_images_per_sec`` (the original code's float32 step on the same device, when
  ``--original`` names it; else a line saying it was skipped) and ``train_speedup_vs_original``
  for each dtype;
- ``sampling_images_per_sec`` for ancestral sampling at T = ``--sample_steps`` (1000) and for
  each few-step sampler of ``--few_step`` (``name:steps``; a sampler that
  :mod:`vdm_jax.models.sampling` lacks gives a "skipped" line);
- ``eval_images_per_sec``: the bound of a batch.

Every line holds ``figure``, ``value``, ``unit`` and the settings it was measured with, plus
the device and date. ``--remat`` rematerialises each block (``ScoreUNet.remat``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from benchmarks import common
from experiments import original

PAPER = dict(
    n_layer=32,
    n_embd=128,
    resolution=32,
    batch=128,
    steps=20,
    sample_batch=128,
    sample_steps=1000,
    eval_batches=5,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    original.add_flag(p)
    for name, value in PAPER.items():
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {value}")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument(
        "--few_step",
        default="ddim:20,dpm_solver:20",
        help="comma-separated sampler:steps of vdm_jax.models.sampling's <sampler>_sample",
    )
    p.add_argument(
        "--remat", action="store_true", help="ScoreUNet.remat (jax.checkpoint per block)"
    )
    p.add_argument(
        "--hard_limit",
        type=float,
        default=None,
        help="seconds; exit then, keeping the lines printed (0: none; default 540, smoke 0)",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny model, one step of each")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    for name, value in (common.SMOKE if args.smoke else PAPER).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.hard_limit is None:
        args.hard_limit = 0.0 if args.smoke else 540.0
    return args


class Lines:
    """Prints (and appends to a file) one JSON object per figure."""

    def __init__(self, path: str | None, context: dict):
        self.path, self.context, self.lines = path, context, []

    def emit(self, figure: str, value, unit: str, **settings) -> None:
        line = {"figure": figure, "value": value, "unit": unit, **settings, **self.context}
        self.lines.append(line)
        text = json.dumps(line, sort_keys=True, default=str)
        print(text, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(text + "\n")


def main(argv=None) -> list[dict]:
    start = time.perf_counter()
    args = parse_args(argv)
    # Compile times are figures here: never read programs from a persistent cache.
    jax.config.update("jax_enable_compilation_cache", False)

    env = common.environment()
    lines = Lines(
        args.out,
        {
            "device_kind": env["device_kind"],
            "backend": env["backend"],
            "date": env["date"],
            "jax_version": env["jax_version"],
        },
    )
    if args.hard_limit > 0:

        def watchdog():
            time.sleep(max(0.0, args.hard_limit - (time.perf_counter() - start)))
            lines.emit("stopped", args.hard_limit, "s", reason="hard limit reached")
            os._exit(0)

        threading.Thread(target=watchdog, daemon=True).start()

    model = {k: getattr(args, k) for k in ("n_layer", "n_embd", "resolution")}
    fields = {"remat": True} if args.remat else {}

    def attempt(name, fn):
        try:
            return fn()
        except Exception as e:  # record it and measure the rest
            traceback.print_exc()
            lines.emit(name, None, "error", error=f"{type(e).__name__}: {e}"[:300])
            return None

    sizes, seconds = ((256,), 0.05) if args.smoke else (None, 1.0)
    peak = attempt("matmul_peak", lambda: common.matmul_peak("bfloat16", sizes, seconds))
    if peak:
        lines.emit(
            "matmul_peak",
            peak["flops_per_sec"],
            "FLOP/s",
            dtype="bfloat16",
            matmul_size=peak["matmul_size"],
        )

    ours = {}
    for dtype in [d for d in args.dtypes.split(",") if d]:
        r = attempt(
            f"train:{dtype}",
            lambda d=dtype: common.bench_train_steps(
                modes=("jit",),
                **model,
                batch=args.batch,
                steps=args.steps,
                dtype=d,
                fields=fields,
                flops_source="lowered",
            )["jit"],
        )
        if r is None:
            continue
        ours[dtype] = r
        s = dict(dtype=dtype, batch=args.batch, **model, **fields)
        lines.emit("train_images_per_sec", r["images_per_sec"], "images/s", **s)
        if peak:
            fraction = r["flops_per_step"] / r["step_s"] / peak["flops_per_sec"]
            lines.emit(
                "train_peak_fraction",
                fraction,
                "of the bfloat16 matmul peak",
                flops_per_step=r["flops_per_step"],
                **s,
            )
        lines.emit("train_compile_s", r["compile_s"], "s", **s)
        lines.emit("train_compiled_peak_bytes", r["compiled_peak_bytes"], "bytes", **s)
        if "device_peak_bytes" in r:
            lines.emit("train_device_peak_bytes", r["device_peak_bytes"], "bytes", **s)

    if original.find(args.original) is None:
        lines.emit(
            "original_train_images_per_sec",
            None,
            "skipped",
            reason=f"no {original.FILE} at {args.original!r}; pass --original PATH",
        )
    else:
        theirs = attempt("original_train", lambda: _original_step(args))
        if theirs:
            s = dict(dtype="float32", batch=args.batch, **model)
            lines.emit(
                "original_train_images_per_sec",
                theirs["images_per_sec"],
                "images/s",
                compile_s=theirs["compile_s"],
                **s,
            )
            for dtype, r in ours.items():
                lines.emit(
                    "train_speedup_vs_original",
                    r["images_per_sec"] / theirs["images_per_sec"],
                    "x",
                    dtype=dtype,
                    batch=args.batch,
                )

    samplers = [("ancestral", args.sample_steps)]
    for item in [x for x in args.few_step.split(",") if x]:
        name, _, count = item.partition(":")
        samplers.append((name, int(count or 20)))
    for name, count in samplers:
        s = dict(sampler=name, num_steps=count, batch=args.sample_batch, dtype="float32", **model)
        if not hasattr(common.sampling, f"{name}_sample"):
            lines.emit(
                "sampling_images_per_sec",
                None,
                "skipped",
                reason=f"vdm_jax.models.sampling has no {name}_sample",
                **s,
            )
            continue
        r = attempt(
            f"sampling:{name}",
            lambda n=name, c=count: common.bench_sampling(
                **model, batch=args.sample_batch, num_steps=c, sampler=n
            ),
        )
        if r:
            lines.emit(
                "sampling_images_per_sec",
                r["images_per_sec"],
                "images/s",
                compile_s=r["compile_s"],
                **s,
            )

    r = attempt(
        "eval", lambda: common.bench_eval(**model, batch=args.batch, batches=args.eval_batches)
    )
    if r:
        lines.emit(
            "eval_images_per_sec",
            r["images_per_sec"],
            "images/s",
            batch=args.batch,
            compile_s=r["compile_s"],
            dtype="float32",
            **model,
        )
    lines.emit("total_s", time.perf_counter() - start, "s")
    return lines.lines


def _original_step(args) -> dict:
    """The original code's float32 train step under jit on this device: median images/s."""
    batches = common.synthetic_batches(2, args.batch, args.resolution, 3)
    call, compile_s, _ = original.timed_train_step(
        original.from_args(args), batches, jax.random.key(1)
    )
    times = common.alternate({"theirs": call}, args.steps)["theirs"]
    return {"images_per_sec": args.batch / common.median(times), "compile_s": compile_s}


if __name__ == "__main__":
    main()
