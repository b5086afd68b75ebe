"""Our VDM against the original authors' code, side by side in one process, as ratios.

    python benchmarks/side_by_side.py --original /path/to/google-research-vdm [--json out.json]
    python benchmarks/side_by_side.py --original ... --sections train --steps 20
    python benchmarks/side_by_side.py --original ... --smoke     # a tiny model, seconds

The original code is google-research/vdm (``model_vdm.py``; only that file is imported, see
``benchmarks/original.py``); ``--original`` names a checkout or the folder holding the file
(default: the ``VDM_ORIGINAL`` environment variable). Without it the script prints why it
skipped and exits 0.

Both models have the same settings: ``--n_layer`` blocks of ``--n_embd`` channels, Fourier
features, attention in the middle, a learned linear schedule, continuous time, V = 256,
dropout 0.1, float32, on synthetic uint8 images. Sections (``--sections``):

- ``train``: the train step of each, compiled once, then one step of each in turn (ours
  under jit, ours under pmap, theirs under jit) ``--steps`` times after one warm-up; each
  timed call includes putting the batch on the device and waiting for the result. Medians.
- ``eval``: the bound of a batch without dropout, alternating batches, medians.
- ``sampling``: ancestral sampling of ``--sample_batch`` images at ``--sample_steps`` = T for
  both, alternating ``--sample_repeats`` times, medians.

For each: compile seconds and the compiled programs' peak memory (XLA's memory analysis).
Ratios are "ours / theirs" in images/s (above 1: ours is faster), "theirs / ours" in compile
time, and "ours / theirs" in peak memory. ``--formulation`` picks our model's fields
(``benchmarks.common.FORMULATIONS``; default: "cpu" on a CPU, "plain" elsewhere). The
1-minute load average is recorded before and after, as the timings depend on it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from benchmarks import common
from experiments import original
from vdm_jax.models import sampling
from vdm_jax.training import parallel, steps

SECTIONS = ("train", "eval", "sampling")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    original.add_flag(p)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=32, help="a multiple of 32 (their GroupNorm)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed train steps of each")
    p.add_argument("--eval_batches", type=int, default=6)
    p.add_argument("--sample_batch", type=int, default=4)
    p.add_argument("--sample_steps", type=int, default=200, help="T of both samplers")
    p.add_argument("--sample_repeats", type=int, default=2)
    p.add_argument("--modes", default="jit,pmap", help="our train step's modes")
    p.add_argument("--formulation", default=None, help="our model's fields: cpu or plain")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--smoke", action="store_true", help="a tiny model, one step of each")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in {**common.SMOKE, "sample_repeats": 1}.items():
            setattr(args, key, value)
    return args


def _summary(times: list[float], unit: str, compiled, compile_s: float, batch: int) -> dict:
    """One program's figures: the median of ``times`` as ``unit``, images/s, compile seconds
    and the compiled program's memory."""
    value = common.median(times)
    return {unit: value, "images_per_sec": batch / value, "compile_s": compile_s,
            **common.memory_bytes(compiled)}  # fmt: skip


def _ratios(prefix: str, ours: dict, theirs: dict, suffix: str = "") -> dict[str, float]:
    """Speed (ours / theirs in images/s), compile (theirs / ours) and peak memory (ours /
    theirs) of two :func:`_summary` results."""
    return {
        f"{prefix}_speed{suffix}": ours["images_per_sec"] / theirs["images_per_sec"],
        f"{prefix}_compile{suffix}": theirs["compile_s"] / ours["compile_s"],
        f"{prefix}_peak_memory{suffix}": ours["compiled_peak_bytes"]
        / theirs["compiled_peak_bytes"],
    }


def train_section(args, theirs, formulation):
    """Train steps of ours (each mode) and theirs, alternating; medians and ratios."""
    model = common.build_model(args.n_layer, args.n_embd, formulation=formulation)
    host_state = common.init_state(model, (args.resolution, args.resolution, 3))
    batches = common.synthetic_batches(2, args.batch, args.resolution, 3)
    key = jax.random.key(1)
    modes = [m for m in args.modes.split(",") if m]
    runs = {m: common.compile_train_step(model, m, host_state, batches[0], key) for m in modes}
    their_call, their_compile, their_compiled = original.timed_train_step(theirs, batches, key)
    calls = {
        f"ours_{m}": functools.partial(
            lambda run, i: common.dispatch_train_step(run, batches[i % 2]), runs[m]
        )
        for m in modes
    }
    calls["theirs_jit"] = their_call
    times = common.alternate(calls, args.steps)
    out = {"theirs_jit": _summary(times["theirs_jit"], "step_s", their_compiled, their_compile,
                                  args.batch)}  # fmt: skip
    for m in modes:
        run = runs[m]
        out[f"ours_{m}"] = _summary(
            times[f"ours_{m}"], "step_s", run["compiled"], run["compile_s"], args.batch
        )
    ratios = {}
    for m in modes:
        ratios.update(_ratios("train", out[f"ours_{m}"], out["theirs_jit"], f"_{m}"))
    return {"times": times, "results": out, "ratios": ratios, "batch": args.batch}


def _pair(name, batch, ours, theirs, count, warmup=1):
    """Time ``ours`` and ``theirs`` (each ``(call(i) -> seconds, compiled, compile_s)``)
    alternately; their summaries and ratios."""
    unit = "seconds" if name == "sampling" else "batch_s"
    times = common.alternate({"ours": ours[0], "theirs": theirs[0]}, count, warmup)
    out = {
        who: _summary(times[who], unit, program[1], program[2], batch)
        for who, program in (("ours", ours), ("theirs", theirs))
    }
    ratios = _ratios(name, out["ours"], out["theirs"])
    return {"times": times, "results": out, "ratios": ratios, "batch": batch}


def eval_section(args, theirs, formulation):
    """The bound of a batch, ours (jit over the mesh) and theirs (jit), alternating."""
    model = common.build_model(args.n_layer, args.n_embd, formulation=formulation)
    dp = parallel.DataParallel("jit", parallel.make_mesh(None))
    params = dp.put_params(common.init_state(model, (args.resolution, args.resolution, 3)).params)
    batches = common.synthetic_batches(2, args.batch, args.resolution, 3, seed=1)
    key = jax.random.key(2)
    ours, ours_compile = common.compile_timed(
        dp.compile_eval_step(steps.make_eval_step(model)),
        params,
        dp.put_global_batch(batches[0]),
        key,
    )
    their_params = theirs.init_state()["params"]
    their, their_compile = common.compile_timed(
        jax.jit(theirs.eval_bpd), their_params, batches[0]["image"], key
    )

    def our_call(i):
        common.block(ours(params, dp.put_global_batch(batches[i % 2]), key))

    def their_call(i):
        common.block(their(their_params, jax.device_put(batches[i % 2]["image"]), key))

    return _pair(
        "eval", args.batch, (common.timed(our_call), ours, ours_compile),
        (common.timed(their_call), their, their_compile), args.eval_batches,
    )  # fmt: skip


def sampling_section(args, theirs, formulation):
    """Ancestral sampling at the same T, ours and theirs, alternating."""
    shape = (args.sample_batch, args.resolution, args.resolution, 3)
    model = common.build_model(args.n_layer, args.n_embd, formulation=formulation)
    variables = {"params": common.init_state(model, (args.resolution, args.resolution, 3)).params}
    key = jax.random.key(3)
    ours, ours_compile = common.compile_timed(
        sampling.ancestral_sample, model, variables, key, shape=shape,
        num_steps=args.sample_steps,
    )  # fmt: skip
    their_params = theirs.init_state()["params"]
    their_fn = jax.jit(
        functools.partial(
            theirs.ancestral_sample, batch=args.sample_batch, num_steps=args.sample_steps
        )
    )
    their, their_compile = common.compile_timed(their_fn, their_params, key)

    def our_call(i):
        common.block(ours(variables, jax.random.fold_in(key, i)))

    def their_call(i):
        common.block(their(their_params, jax.random.fold_in(key, i)))

    result = _pair(
        "sampling", args.sample_batch, (common.timed(our_call), ours, ours_compile),
        (common.timed(their_call), their, their_compile), args.sample_repeats, warmup=0,
    )  # fmt: skip
    return {**result, "num_steps": args.sample_steps}


def table(result: dict) -> str:
    """Ratios first, then the absolute figures, as Markdown."""
    lines = ["| figure | ours / original | ours | original |", "| --- | --- | --- | --- |"]
    train = result.get("train")
    if train:
        their = train["results"]["theirs_jit"]
        for name, r in train["results"].items():
            if name.startswith("ours_"):
                mode = name[len("ours_") :]
                lines.append(
                    f"| train images/s ({mode} vs jit, batch {train['batch']}) | "
                    f"{train['ratios'][f'train_speed_{mode}']:.2f}x | "
                    f"{r['images_per_sec']:.1f} ({r['step_s'] * 1e3:.0f} ms) | "
                    f"{their['images_per_sec']:.1f} ({their['step_s'] * 1e3:.0f} ms) |"
                )
        ours = train["results"][next(n for n in train["results"] if n.startswith("ours_"))]
        lines.append(
            f"| train compile s | {their['compile_s'] / ours['compile_s']:.2f}x faster "
            f"| {ours['compile_s']:.1f} | {their['compile_s']:.1f} |"
        )
        lines.append(_memory_row("train", ours, their))
    for name, label in (("eval", "eval images/s"), ("sampling", "ancestral sampling images/s")):
        section = result.get(name)
        if not section:
            continue
        ours, their = section["results"]["ours"], section["results"]["theirs"]
        extra = f", T = {section['num_steps']}" if name == "sampling" else ""
        lines.append(
            f"| {label} (batch {section['batch']}{extra}) | "
            f"{section['ratios'][f'{name}_speed']:.2f}x | {ours['images_per_sec']:.3g} | "
            f"{their['images_per_sec']:.3g} |"
        )
        lines.append(
            f"| {name} compile s | {their['compile_s'] / ours['compile_s']:.2f}x faster "
            f"| {ours['compile_s']:.1f} | {their['compile_s']:.1f} |"
        )
        lines.append(_memory_row(name, ours, their))
    return "\n".join(lines)


def _memory_row(name, ours, their) -> str:
    o, t = ours["compiled_peak_bytes"], their["compiled_peak_bytes"]
    mib = 2.0**20
    return f"| {name} compiled peak memory | {o / t:.2f}x | {o / mib:.0f} MiB | {t / mib:.0f} MiB |"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if original.find(args.original) is None:
        why = (
            f"skipped: no {original.FILE} at {args.original!r}"
            if args.original
            else "skipped: the original code's path is not given"
        )
        print(
            f"{why}; pass --original PATH (or set VDM_ORIGINAL) to a checkout of "
            "https://github.com/google-research/vdm"
        )
        return {"skipped": why}
    # Compile times are figures here: never read programs from a persistent cache.
    jax.config.update("jax_enable_compilation_cache", False)

    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; known: {list(SECTIONS)}")
    formulation = args.formulation or common.default_formulation()
    theirs = original.from_args(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("json",)}
    result = {
        "environment": common.environment(),
        "settings": settings,
        "formulation": formulation,
        "load_before": os.getloadavg()[0],
    }
    run = {"train": train_section, "eval": eval_section, "sampling": sampling_section}
    for name in sections:
        print(f"{name} ...", file=sys.stderr, flush=True)
        result[name] = run[name](args, theirs, formulation)
    result["load_after"] = os.getloadavg()[0]
    result["ratios"] = {k: v for name in sections for k, v in result[name]["ratios"].items()}
    print(table(result))
    print(
        f"\n1-minute load {result['load_before']:.2f} before, {result['load_after']:.2f} after;"
        f" our formulation: {formulation}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True, default=str)
    return result


if __name__ == "__main__":
    main()
