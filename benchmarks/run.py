"""The benchmark suite: train step, evaluation and sampling speed, memory, FLOPs, peak fraction.

    python benchmarks/run.py                 # defaults for this backend (see PRESETS)
    python benchmarks/run.py --smoke         # one step of a tiny model (CI)
    python benchmarks/run.py --preset cifar10 --json out.json

Prints a table and writes JSON (default ``benchmarks/results/<backend>-<date>.json``). Every
number comes from this run: the peak is a large matmul in the compute dtype measured here, the
FLOPs are XLA's cost analysis of the compiled train step. Runs from the repository root without
installing the package (``PYTHONPATH=.`` is optional); needs only jax, flax, optax, diffrax
and numpy.

Presets: ``cpu`` (4 blocks, 32 channels, 32x32x3, batch 32, float32; the default on a CPU),
``cifar10`` (the paper's CIFAR-10 model of vdm_jax/configs/cifar10.py: 32 blocks, 128
channels, batch 128, bfloat16; the default on a GPU or TPU) and ``smoke``. Flags override
the preset's values. Each section catches its own errors (recorded in the JSON) and the JSON is
rewritten after every section, so a failure or the time budget keeps what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback

PRESETS = {
    "cpu": dict(
        n_layer=4, n_embd=32, resolution=32, channels=3, batch=32, dtype="float32", steps=8,
        modes="jit,pmap", flops="compiled", eval_batches=3, sample_batch=4, sample_steps=1000,
        time_budget=150.0, hard_limit=0.0,
    ),
    "cifar10": dict(
        n_layer=32, n_embd=128, resolution=32, channels=3, batch=128, dtype="bfloat16",
        steps=20, modes="jit", flops="lowered", eval_batches=5, sample_batch=128,
        sample_steps=1000, time_budget=180.0, hard_limit=285.0,
    ),
    "smoke": dict(
        n_layer=1, n_embd=16, resolution=8, channels=3, batch=8, dtype="float32", steps=1,
        modes="jit", flops="lowered", eval_batches=1, sample_batch=2, sample_steps=10,
        time_budget=3600.0, hard_limit=0.0,  # every section, however loaded the machine
    ),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="default: cpu on a CPU backend, cifar10 on an accelerator",
    )
    p.add_argument("--smoke", action="store_true", help="the smoke preset (one tiny step)")
    for name in (
        "n_layer",
        "n_embd",
        "resolution",
        "channels",
        "batch",
        "steps",
        "eval_batches",
        "sample_batch",
        "sample_steps",
    ):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--modes", default=None, help="comma-separated: jit,pmap")
    p.add_argument(
        "--flops",
        choices=("compiled", "lowered", "none"),
        default=None,
        help="how XLA counts the step's FLOPs (see common.step_flops)",
    )
    p.add_argument("--steps_per_dispatch", type=int, default=1)
    p.add_argument(
        "--formulation",
        default=None,
        help="the model's fields: cpu or plain (default: cpu on a CPU)",
    )
    p.add_argument("--num_devices", type=int, default=None, help="default: all")
    p.add_argument(
        "--time_budget",
        type=float,
        default=None,
        help="seconds; later sections are skipped once it is spent",
    )
    p.add_argument(
        "--hard_limit",
        type=float,
        default=None,
        help="seconds; print what was measured and exit then, even mid-compilation (0: none)",
    )
    p.add_argument(
        "--skip", default="", help="comma-separated sections to skip: peak,train,eval,sampling"
    )
    p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before jax starts")
    p.add_argument("--json", default=None, help="output path")
    return p.parse_args(argv)


def _settings(args, backend: str) -> dict:
    preset = "smoke" if args.smoke else args.preset or ("cpu" if backend == "cpu" else "cifar10")
    settings = dict(PRESETS[preset], preset=preset)
    for key in list(settings):
        value = getattr(args, key, None)
        if value is not None and key != "preset":
            settings[key] = value
    settings["modes"] = [m for m in settings["modes"].split(",") if m]
    settings["steps_per_dispatch"] = args.steps_per_dispatch
    settings["num_devices"] = args.num_devices
    settings["formulation"] = args.formulation or ("cpu" if backend == "cpu" else "plain")
    return settings


def _gib(x) -> str:
    return "-" if x is None or x != x else f"{x / 2**30:.2f} GiB"


def _num(x, fmt="{:.3g}") -> str:
    return "-" if x is None or x != x else fmt.format(x)


def table(result: dict) -> str:
    """The results as a Markdown table."""
    s = result["settings"]
    peak = result.get("matmul_peak", {}).get("flops_per_sec")
    lines = [
        f"{result['environment'].get('device_kind', '?')} ({result['environment']['backend']}), "
        f"{result['environment']['date']}: {s['n_layer']} blocks, {s['n_embd']} channels, "
        f"{s['resolution']}x{s['resolution']}x{s['channels']}, {s['dtype']}",
        "",
        "| measurement | value |",
        "| --- | --- |",
        f"| {s['dtype']} matmul peak (measured) | {_num(peak and peak / 1e9, '{:.0f}')} GFLOP/s |",
    ]
    for mode, r in result.get("train", {}).items():
        if "error" in r:
            lines.append(f"| train step ({mode}) | error: {r['error']} |")
            continue
        lines += [
            f"| train images/s ({mode}, batch {r['batch']}) | {r['images_per_sec']:.1f} |",
            f"| train step ({mode}) | {r['step_s'] * 1e3:.0f} ms "
            f"(compile {r['compile_s']:.1f} s) |",
            f"| train FLOPs per step (XLA) | {r['flops_per_step'] / 1e9:.2f} GFLOP |",
            f"| achieved ({mode}) | {r['flops_per_step'] / r['step_s'] / 1e9:.1f} GFLOP/s = "
            f"{_num(100 * r.get('peak_fraction', float('nan')), '{:.1f}')}% of peak |",
            f"| train memory ({mode}): compiled peak / process max RSS | "
            f"{_gib(r.get('compiled_peak_bytes'))} / {_gib(r.get('process_max_rss_bytes'))} |",
        ]
        if "device_peak_bytes" in r:
            lines.append(f"| device peak bytes in use | {_gib(r['device_peak_bytes'])} |")
    e = result.get("eval")
    if e and "error" not in e:
        lines += [
            f"| eval images/s (batch {e['batch']}) | {e['images_per_sec']:.1f} "
            f"(compile {e['compile_s']:.1f} s) |",
            f"| eval compiled peak memory | {_gib(e.get('compiled_peak_bytes'))} |",
        ]
    elif e:
        lines.append(f"| eval | error: {e['error']} |")
    a = result.get("sampling")
    if a and "error" not in a:
        lines += [
            f"| ancestral sampling images/s (T={a['num_steps']}, batch {a['batch']}) | "
            f"{_num(a['images_per_sec'], '{:.3g}')} ({a['seconds']:.1f} s, "
            f"compile {a['compile_s']:.1f} s) |",
            f"| sampling compiled peak memory | {_gib(a.get('compiled_peak_bytes'))} |",
        ]
    elif a:
        lines.append(f"| sampling | error: {a['error']} |")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    start = time.perf_counter()
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import common  # jax starts here, after XLA_FLAGS

    env = common.environment()
    s = _settings(args, env["backend"])
    path = args.json or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"{env['backend']}-{s['preset']}-{env['date']}.json",
    )  # fmt: skip
    result = {"environment": env, "settings": s, "train": {}, "skipped": {}}
    skip = {x for x in args.skip.split(",") if x}
    model_kw = {
        k: s[k] for k in ("n_layer", "n_embd", "resolution", "channels", "dtype", "formulation")
    }

    def save():
        result["total_s"] = time.perf_counter() - start
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        text = json.dumps(result, indent=2, sort_keys=True, default=str)
        with open(path, "w") as f:
            f.write(text)

    if s["hard_limit"] > 0:  # report what was measured, then exit, even mid-compilation

        def watchdog():
            time.sleep(max(0.0, s["hard_limit"] - (time.perf_counter() - start)))
            result["incomplete"] = f"stopped at the hard limit of {s['hard_limit']:.0f} s"
            try:
                save()
                print(table(result), f"\n{result['incomplete']}; wrote {path}", flush=True)
            finally:
                os._exit(0)

        threading.Thread(target=watchdog, daemon=True).start()

    def section(name, fn):
        if name.split(":")[0] in skip:
            result["skipped"][name] = "--skip"
            return None
        elapsed = time.perf_counter() - start
        if elapsed > s["time_budget"]:
            result["skipped"][name] = f"time budget ({elapsed:.0f} s > {s['time_budget']:.0f} s)"
            return None
        print(f"[{elapsed:6.1f} s] {name} ...", file=sys.stderr, flush=True)
        try:
            out = fn()
        except Exception as e:  # keep going: record it and measure the rest
            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {e}"[:500]}
        save()
        return out

    small = s["preset"] == "smoke"
    sizes, seconds = ((256,), 0.05) if small else (None, 1.0)
    peak = section("peak", lambda: common.matmul_peak(s["dtype"], sizes, seconds))
    if peak is not None:
        result["matmul_peak"] = peak
    modes = tuple(s["modes"])
    runs = section(f"train:{','.join(modes)}", lambda: common.bench_train_steps(
        modes=modes, **model_kw, batch=s["batch"], steps=s["steps"], flops_source=s["flops"],
        steps_per_dispatch=s["steps_per_dispatch"], num_devices=s["num_devices"]))  # fmt: skip
    if runs is not None and "error" in runs:
        result["train"] = {mode: runs for mode in modes}
    elif runs is not None:
        for mode, r in runs.items():
            if peak and "flops_per_sec" in peak:
                common.add_peak_fraction(r, peak)
            result["train"][mode] = r
    save()
    r = section(
        "eval",
        lambda: common.bench_eval(
            **model_kw, batch=s["batch"], batches=s["eval_batches"], num_devices=s["num_devices"]
        ),
    )
    if r is not None:
        result["eval"] = r
    r = section("sampling", lambda: common.bench_sampling(
        **model_kw, batch=s["sample_batch"], num_steps=s["sample_steps"]))  # fmt: skip
    if r is not None:
        result["sampling"] = r
    save()
    print(table(result))
    print(f"\nwrote {path} ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
