"""Time the VDM train step on synthetic data and print one JSON line.

    python benchmarks/train_step.py --n_layer 4 --n_embd 32 --resolution 32 --channels 3 \
        --batch 32 --steps 10 [--dtype float32|bfloat16] [--mode jit|pmap] \
        [--steps_per_dispatch K] [--formulation cpu|plain] [--remat] [--json out.json]

Fields: images_per_sec, step_s (median), compile_s, flops_per_step (XLA's cost analysis of the
compiled step), peak_flops_per_sec (a large matmul in the compute dtype, measured here),
peak_fraction (achieved FLOP/s over that peak), the compiled executable's memory analysis and
the process's max RSS. Runs from the repository root without installing the package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DTYPES = ("float32", "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=32)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--mode", default="jit", help="jit, pmap, or jit,pmap (alternating)")
    p.add_argument("--steps_per_dispatch", type=int, default=1)
    p.add_argument("--num_devices", type=int, default=None, help="default: all")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument(
        "--formulation",
        default=None,
        help="the model's fields: cpu or plain (default: cpu on a CPU)",
    )
    p.add_argument(
        "--remat", action="store_true", help="ScoreUNet.remat (jax.checkpoint per block)"
    )
    p.add_argument("--no_peak", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before jax starts")
    p.add_argument("--json", default=None, help="also write the result to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import common  # jax starts here, after XLA_FLAGS

    modes = tuple(m for m in args.mode.split(",") if m)
    results = common.bench_train_steps(
        modes=modes,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        resolution=args.resolution,
        channels=args.channels,
        batch=args.batch,
        steps=args.steps,
        dtype=args.dtype,
        steps_per_dispatch=args.steps_per_dispatch,
        num_devices=args.num_devices,
        dropout_rate=args.dropout,
        formulation=args.formulation or common.default_formulation(),
        fields={"remat": True} if args.remat else None,
    )
    env = common.environment()
    if args.no_peak:
        peak = {"flops_per_sec": float("nan"), "matmul_size": 0}
    else:
        peak = common.matmul_peak(args.dtype)
    for r in results.values():
        r.update(env)
        common.add_peak_fraction(r, peak)
    # One line: the mode's fields, or with several modes {"modes": {mode: fields}}.
    result = results[modes[0]] if len(modes) == 1 else {"modes": results, **env}
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
