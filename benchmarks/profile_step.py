"""Where the time goes: shares of a compiled program's operations, from a jax.profiler trace.

    python benchmarks/profile_step.py                       # ours: train, eval, sampling
    python benchmarks/profile_step.py --original /path/to/google-research-vdm   # and theirs
    python benchmarks/profile_step.py --smoke               # a tiny model, seconds

Each program (``--programs``: the train step, the bound of a batch, ``--sample_steps``
ancestral steps) is compiled once and called ``--calls`` times under ``jax.profiler.trace``.
The trace's per-operation events (XLA's thunks, one per executed HLO instruction, on whichever
thread ran it) are summed by instruction and classified from the optimised HLO:

- kind: convolutions (a fusion holding a convolution; split into the kernel gradient and the
  rest), matmuls (dot), reductions, copies and transposes, random numbers (the threefry hash
  and its loops), the rest elementwise;
- direction: forward (under ``jvp``), backward (under ``transpose(jvp)``) or neither (the
  optimizer, the EMA, the noise), from the instruction's ``op_name`` metadata;
- part of the model: the Flax module whose name appears in ``op_name`` (GroupNorm, attention,
  convolution layers, dense layers), else "other".

``gflops`` is XLA's FLOP count of the program before optimisation (ours counted on the
"plain" formulation, which has no loops; a loop's body counts once, so the sampler's figure is
one step). Shares are of the summed operation time (work on every thread), so they are robust to the
machine's load; the wall time per call and the work per call are printed beside them. The
model settings are those of ``benchmarks/side_by_side.py`` (4 blocks, 32 channels, 32x32x3,
batch 32, our CPU formulation on a CPU).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from benchmarks import common
from experiments import original
from vdm_jax.models import sampling
from vdm_jax.training import parallel, steps

PROGRAMS = ("train", "eval", "sampling")
# Instructions whose thunk contains other thunks: their time is their children's.
_CONTROL = {"while", "conditional", "call"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_RANDOM = re.compile(r"threefry|random_bits|bernoulli|random_split|random_fold_in")
_WINDOW = re.compile(r"window=\{size=([\dx]+)")
# Flax module names (ours and the original code's) in op_name -> part of the model, tried
# from the deepest module outwards; attention first, as it holds dense layers of its own.
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_PARTS = (
    (re.compile(r"^(norm|GroupNorm)"), "GroupNorm"),
    (re.compile(r"^(conv|Conv_)"), "3x3 convolution layers"),
    (re.compile(r"dense|Dense|proj|shortcut|embed"), "dense layers and 1x1 projections"),
    (re.compile(r"block|Block"), "ResNet blocks' other operations (swish, dropout, adds)"),
    (re.compile(r"score_net|ScoreUNet|score_model"), "score network, outside the blocks"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    original.add_flag(p)
    p.add_argument("--programs", default=",".join(PROGRAMS))
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=32)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sample_batch", type=int, default=4)
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument("--calls", type=int, default=3, help="traced calls of each program")
    p.add_argument("--formulation", default=None, help="our model's fields: cpu or plain")
    p.add_argument("--smoke", action="store_true", help="a tiny model, one call of each")
    p.add_argument("--json", default=None, help="also write the shares here")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in {**common.SMOKE, "sample_steps": 2, "calls": 1}.items():
            setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------ the HLO


def instructions(hlo_text: str) -> dict[str, dict]:
    """Every instruction of an optimised HLO module: name -> {opcode, op_name, calls,
    contents, window}: ``contents`` are the opcodes of a fusion's fused computation (empty
    for other instructions), ``window`` the largest convolution window (pixels) it computes."""
    found, bodies, computation = {}, collections.defaultdict(set), None
    windows = collections.Counter()
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and line.rstrip().endswith("{"):
            computation = head.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, opcode = m.groups()
        op_name = _OP_NAME.search(line)
        calls = _CALLS.search(line)
        window = _WINDOW.search(line) if opcode == "convolution" else None
        size = 1
        for n in window.group(1).split("x") if window else ():
            size *= int(n)
        found[name] = {
            "opcode": opcode,
            "op_name": op_name.group(1) if op_name else "",
            "calls": calls.group(1) if calls else None,
            "window": size,
        }
        bodies[computation].add(opcode)
        windows[computation] = max(windows[computation], size)
    for info in found.values():
        fused = info["opcode"] == "fusion"
        info["contents"] = bodies.get(info["calls"], set()) if fused else set()
        if fused:
            info["window"] = max(info["window"], windows.get(info["calls"], 1))
    return found


def kind(name: str, info: dict) -> str:
    """The kind of operation an executed instruction is (see the module docstring)."""
    ops = info["contents"] | {info["opcode"]}
    if "convolution" in ops:
        # A kernel gradient is a convolution whose window is the image (3x3 kernels: 9 pixels).
        return "convolutions (kernel gradient)" if info["window"] > 9 else "convolutions"
    if "dot" in ops:
        return "matmuls"
    if _RANDOM.search(info["op_name"]) or "rng" in ops or "rng-bit-generator" in ops:
        return "random numbers"
    if "reduce" in ops or "reduce-window" in ops:
        return "reductions"
    if ops <= {"copy", "transpose", "bitcast", "fusion", "parameter"} or "transpose" in name:
        return "copies and transposes"
    return "elementwise"


def direction(info: dict) -> str:
    """forward, backward or outside the gradient, from the ``op_name`` metadata."""
    op_name = info["op_name"]
    if "transpose(" in op_name:
        return "backward (transpose)"
    if "jvp(" in op_name:
        return "forward (jvp)"
    return "outside the gradient"


def part(info: dict) -> str:
    """The part of the model an instruction computes, from its ``op_name`` (a fusion's is
    its root's: elementwise work fused across modules counts where its root is)."""
    segments = info["op_name"].split("/")
    if any(_ATTENTION.search(s) for s in segments):
        return "attention"
    for segment in reversed(segments):
        for pattern, label in _PARTS:
            if pattern.search(segment):
                return label
    return "the rest (loss terms, decoder, noise, optimizer)"


# ------------------------------------------------------------------------------ the trace


def trace_calls(compiled, call, count: int) -> tuple[dict[str, float], float]:
    """Run ``call(i)`` ``count`` times under the profiler (after one untraced call); returns
    the summed microseconds per HLO instruction of ``compiled``'s module and the wall seconds
    per call."""
    module = compiled.as_text().split(",", 1)[0].removeprefix("HloModule ").strip()
    call(0)
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for i in range(count):
                call(i + 1)
        wall = (time.perf_counter() - t0) / count
        (path,) = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    micros = collections.Counter()
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
            micros[args["hlo_op"]] += float(e.get("dur", 0.0))
    return dict(micros), wall


def shares(compiled, micros: dict[str, float], count: int, wall: float) -> dict:
    """Operation time by kind, direction and part, as fractions of the total work."""
    table = instructions(compiled.as_text())
    by = {"kind": collections.Counter(), "direction": collections.Counter(),
          "part": collections.Counter()}  # fmt: skip
    for name, us in micros.items():
        info = table.get(name)
        if info is None or info["opcode"] in _CONTROL:
            continue
        by["kind"][kind(name, info)] += us
        by["direction"][direction(info)] += us
        by["part"][part(info)] += us
    total = sum(by["kind"].values())
    return {
        "wall_s_per_call": wall,
        "work_s_per_call": total / 1e6 / count,
        **{k: {name: v / total for name, v in c.most_common()} for k, c in by.items()},
    }


# ------------------------------------------------------------------------------ the programs


def _lowered_flops(jitted, *args, **kwargs) -> float:
    """XLA's FLOP count of a program before optimisation (a loop's body counts once)."""
    analysis = jitted.lower(*args, **kwargs).cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def our_programs(args, formulation: str) -> dict:
    """name -> a builder of (compiled, call(i), FLOPs) for our train step, eval bound and
    ancestral sampler.

    FLOPs are counted on the "plain" formulation (no loops or conditionals), see
    :func:`benchmarks.common.step_flops`."""
    model = common.build_model(args.n_layer, args.n_embd, formulation=formulation)
    plain = common.build_model(args.n_layer, args.n_embd, formulation="plain")
    shape = (args.resolution, args.resolution, 3)
    # On the host: the train step donates the device copy it is given, not these.
    host_state = jax.device_get(common.init_state(model, shape))
    batches = common.synthetic_batches(2, args.batch, args.resolution, 3)
    key = jax.random.key(1)
    dp = parallel.DataParallel("jit", parallel.make_mesh(None))

    def train():
        run = common.compile_train_step(model, "jit", host_state, batches[0], key)
        flops, _ = common.step_flops(
            args.n_layer, args.n_embd, "float32", 0.1, host_state, batches[0], key,
            dp.num_shards, source="lowered",
        )  # fmt: skip
        return run["compiled"], lambda i: common.dispatch_train_step(run, batches[i % 2]), flops

    def evaluate():
        params, batch = dp.put_params(host_state.params), dp.put_global_batch(batches[0])
        compiled, _ = common.compile_timed(
            dp.compile_eval_step(steps.make_eval_step(model)), params, batch, key
        )
        flops = _lowered_flops(
            dp.compile_eval_step(steps.make_eval_step(plain)), params, batch, key
        )

        def call(i):
            common.block(compiled(params, dp.put_global_batch(batches[i % 2]), key))

        return compiled, call, flops

    def sample():
        variables = {"params": host_state.params}
        settings = dict(shape=(args.sample_batch, *shape), num_steps=args.sample_steps)
        compiled, _ = common.compile_timed(
            sampling.ancestral_sample, model, variables, key, **settings
        )
        flops = _lowered_flops(sampling.ancestral_sample, plain, variables, key, **settings)
        return (
            compiled,
            lambda i: common.block(compiled(variables, jax.random.fold_in(key, i))),
            flops,
        )

    return {"train": train, "eval": evaluate, "sampling": sample}


def their_programs(args) -> dict:
    """The same three programs of the original code (see ``benchmarks/original.py``)."""
    theirs = original.from_args(args)
    batches = common.synthetic_batches(2, args.batch, args.resolution, 3)
    key = jax.random.key(1)
    state = theirs.init_state()
    params, image = state["params"], batches[0]["image"]

    def train():
        call, _, compiled = original.timed_train_step(theirs, batches, key)
        return compiled, call, _lowered_flops(jax.jit(theirs.train_step), state, image, key)

    def evaluate():
        jitted = jax.jit(theirs.eval_bpd)
        compiled, _ = common.compile_timed(jitted, params, image, key)

        def call(i):
            common.block(compiled(params, jax.device_put(batches[i % 2]["image"]), key))

        return compiled, call, _lowered_flops(jitted, params, image, key)

    def sample():
        jitted = jax.jit(
            functools.partial(
                theirs.ancestral_sample, batch=args.sample_batch, num_steps=args.sample_steps
            )
        )
        compiled, _ = common.compile_timed(jitted, params, key)
        call = lambda i: common.block(compiled(params, jax.random.fold_in(key, i)))  # noqa: E731
        return compiled, call, _lowered_flops(jitted, params, key)

    return {"train": train, "eval": evaluate, "sampling": sample}


def markdown(results: dict) -> str:
    """One table per (program, grouping): shares of ours (and theirs)."""
    lines = []
    for program, by_code in results.items():
        codes = list(by_code)
        lines.append(f"\n### {program}\n")
        lines.append(
            "| | " + " | ".join(codes) + " |\n| --- | " + " | ".join("---" for _ in codes) + " |"
        )
        for figure in ("gflops", "wall_s_per_call", "work_s_per_call"):
            lines.append(
                f"| {figure} | " + " | ".join(f"{by_code[c][figure]:.3f}" for c in codes) + " |"
            )
        for grouping in ("kind", "direction", "part"):
            names = sorted({n for c in codes for n in by_code[c][grouping]},
                           key=lambda n: -by_code[codes[0]][grouping].get(n, 0.0))  # fmt: skip
            for name in names:
                cells = " | ".join(f"{by_code[c][grouping].get(name, 0.0):.0%}" for c in codes)
                lines.append(f"| {grouping}: {name} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    formulation = args.formulation or common.default_formulation()
    wanted = [p for p in args.programs.split(",") if p]
    unknown = set(wanted) - set(PROGRAMS)
    if unknown:
        raise SystemExit(f"unknown programs {sorted(unknown)}; known: {list(PROGRAMS)}")
    codes = {"ours": our_programs(args, formulation)}
    if original.find(args.original) is not None:
        codes["original"] = their_programs(args)
    results = {}
    for program in wanted:
        results[program] = {}
        for code, programs in codes.items():
            compiled, call, flops = programs[program]()
            micros, wall = trace_calls(compiled, call, args.calls)
            results[program][code] = {
                "gflops": flops / 1e9,
                **shares(compiled, micros, args.calls, wall),
            }
    print(markdown(results))
    print(f"\n1-minute load {os.getloadavg()[0]:.2f}; our formulation: {formulation}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": common.environment(), "settings": vars(args),
                       "results": results}, f, indent=2)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
