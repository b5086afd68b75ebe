"""Shared pieces of the benchmarks: the model, synthetic data, the matmul peak, XLA's counts.

Imports only jax, flax, optax, numpy and ``vdm_jax.{nets, model, train, parallel, sampling,
schedules}``, so it runs where grain, tfds, orbax and ml_collections are not installed.
"""

from __future__ import annotations

import functools
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `python3 benchmarks/run.py` from a checkout without an install
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.common import environment  # noqa: E402, F401 (re-exported for the scripts)
from vdm_jax.models import sampling  # noqa: E402
from vdm_jax.models.unet import ScoreUNet  # noqa: E402
from vdm_jax.models.vdm import VDM, make_schedule  # noqa: E402
from vdm_jax.training import parallel  # noqa: E402
from vdm_jax.training import steps as training_steps  # noqa: E402

VOCAB_SIZE = 256
DTYPES = ("float32", "bfloat16")

#: The tiny model and counts of the scripts' ``--smoke`` runs: seconds on any backend.
SMOKE = dict(
    n_layer=1, n_embd=32, resolution=8, batch=4, steps=1, eval_batches=1, sample_batch=2,
    sample_steps=4,
)  # fmt: skip


#: Model fields of the two formulations the benchmarks run. "plain" keeps every field's
#: default (``jax.nn.dot_product_attention``, the full reconstruction softmax, the whole batch
#: at once); "cpu" is the faster formulation on CPUs that the digits config also chooses: the
#: chunked recomputing attention, the windowed reconstruction normaliser and two batch pieces.
#: Both compute the same function (to float32 rounding).
FORMULATIONS = {
    "plain": {},
    "cpu": {"attention": "chunked", "batch_pieces": 2, "reconstruction_window": 4},
}


def default_formulation() -> str:
    """The formulation the benchmarks run by default here: "cpu" on a CPU, else "plain"."""
    return "cpu" if jax.default_backend() == "cpu" else "plain"


def build_model(
    n_layer: int,
    n_embd: int,
    dtype: str = "float32",
    dropout_rate: float = 0.1,
    schedule: str = "learned_linear",
    formulation: str = "plain",
    **fields: Any,
) -> VDM:
    """The paper's VDM (Fourier features, middle attention, learned linear schedule, V=256).

    Args:
      formulation: a key of :data:`FORMULATIONS`.
      fields: further ``ScoreUNet`` fields, or ``VDM.reconstruction_window``, overriding it.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {sorted(FORMULATIONS)}, got {formulation!r}")
    fields = {**FORMULATIONS[formulation], **fields}
    window = fields.pop("reconstruction_window", 0)
    net = ScoreUNet(
        n_layer=n_layer, n_embd=n_embd, dropout_rate=dropout_rate, dtype=jnp.dtype(dtype), **fields
    )
    return VDM(
        score_net=net, schedule=make_schedule(schedule), vocab_size=VOCAB_SIZE,
        reconstruction_window=window,
    )  # fmt: skip


def init_state(model: VDM, shape: tuple[int, int, int], seed: int = 0) -> training_steps.TrainState:
    """A new train state of ``model`` with the default optimizer, for uint8 images of ``shape``
    (H, W, C), initialised under jit: op by op, initialising the network would compile each of
    its operations as a program of its own."""
    optimizer = training_steps.make_optimizer()
    example = jnp.zeros((1, *shape), jnp.uint8)
    init = jax.jit(lambda key: training_steps.init_state(model, optimizer, key, example))
    return init(jax.random.key(seed))


def synthetic_batches(
    count: int, batch: int, resolution: int, channels: int, seed: int = 0, steps: int = 0
) -> list[dict[str, np.ndarray]]:
    """``count`` batches of uniform uint8 images ``[batch, R, R, C]`` (``[steps, batch, ...]``
    when ``steps`` > 0, for several steps per dispatch)."""
    rng = np.random.default_rng(seed)
    lead = (steps,) if steps else ()
    shape = (*lead, batch, resolution, resolution, channels)
    return [{"image": rng.integers(0, VOCAB_SIZE, shape, dtype=np.uint8)} for _ in range(count)]


def block(tree: Any) -> Any:
    """Wait for every array in ``tree``."""
    return jax.block_until_ready(tree)


# ------------------------------------------------------------------------------ machine limits


def default_matmul_sizes() -> tuple[int, ...]:
    """Square matmul sizes used to measure the peak: large enough to be compute-bound."""
    return (1024, 2048) if jax.default_backend() == "cpu" else (4096, 8192)


def matmul_peak(
    dtype: str = "float32", sizes: tuple[int, ...] | None = None, min_seconds: float = 1.0
) -> dict[str, float]:
    """The machine's FLOP/s on a large square matmul in ``dtype`` (best over sizes and repeats).

    Each size runs chains of ``n x n @ n x n`` products (dispatched asynchronously, waited for
    once per chain) for at least ``min_seconds``; the best chain's rate counts, as the peak.
    """
    sizes = sizes or default_matmul_sizes()
    best = {"flops_per_sec": 0.0, "matmul_size": 0}
    for n in sizes:
        keys = jax.random.split(jax.random.key(n))
        a = jax.random.normal(keys[0], (n, n), jnp.float32).astype(dtype)
        b = (jax.random.normal(keys[1], (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)
        matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        block(matmul(a, b))
        flops = 2.0 * n**3
        # Accelerators: chains of about 50 TFLOP (tens of ms), so that dispatch and the final
        # wait do not count; a CPU takes tens of ms per matmul already.
        chain = max(1, int(5e13 / flops)) if jax.default_backend() != "cpu" else 1
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            block([matmul(a, b) for _ in range(chain)])
            rate = chain * flops / (time.perf_counter() - t0)
            if rate > best["flops_per_sec"]:
                best = {"flops_per_sec": rate, "matmul_size": n}
            if time.perf_counter() - start > min_seconds:
                break
    return best


def add_peak_fraction(result: dict[str, Any], peak: dict[str, float]) -> dict[str, Any]:
    """Add the peak (per machine), the achieved FLOP/s and their ratio to a train result.

    The matmul peak is one device's; an accelerator's devices add up, a CPU's (fake) devices
    share the same cores.
    """
    devices = 1 if jax.default_backend() == "cpu" else result["num_devices"]
    result["peak_flops_per_sec"] = peak["flops_per_sec"] * devices
    result["peak_matmul_size"] = peak.get("matmul_size", 0)
    result["achieved_flops_per_sec"] = result["flops_per_step"] / result["step_s"]
    result["peak_fraction"] = result["achieved_flops_per_sec"] / result["peak_flops_per_sec"]
    return result


# ------------------------------------------------------------------------------ XLA's counts


def cost_flops(compiled) -> float:
    """FLOPs of a compiled executable by XLA's cost analysis (nan when it gives none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", math.nan))


def step_flops(
    n_layer: int,
    n_embd: int,
    dtype: str,
    dropout_rate: float,
    state,
    batch,
    key,
    num_shards: int,
    source: str = "compiled",
) -> tuple[float, str]:
    """FLOPs of one train step of the global batch, by XLA's cost analysis.

    Counted on the "plain" formulation of the model (:data:`FORMULATIONS`), whatever
    formulation is timed: XLA counts a loop's body once and a conditional's largest branch, so
    the chunked attention's loop would count as one chunk and its recomputed attention weights
    as useful work. The plain formulation computes the same function without loops or
    conditionals; its full reconstruction softmax adds well under 1% to the count. The step is
    traced for one device (the whole global batch, ``num_shards`` random-number shards).

    Args:
      n_layer, n_embd, dtype, dropout_rate: the model (see :func:`build_model`).
      state, batch, key: the step's arguments (host arrays).
      source: "compiled" counts the optimised program (``.lower().compile().cost_analysis()``,
        on accelerators compiled without autotuning, which does not change the count);
        "lowered" counts the program before XLA's optimisations, lowered for the host
        whatever the backend (no compilation, seconds; about 2% fewer FLOPs for the small CPU
        model).

    Returns:
      (FLOPs, the source used: "compiled" or "lowered", the latter also when compiling failed).
    """
    model = build_model(n_layer, n_embd, dtype, dropout_rate, formulation="plain")
    step_fn = training_steps.make_train_step(model, training_steps.make_optimizer(), 0.9999)
    # The GPU client's analysis of a lowered program reports no FLOPs; before XLA's
    # optimisations the program is the same on every backend, so the host counts it.
    device = jax.devices("cpu" if source == "lowered" else None)[0]
    state, batch, key = jax.device_put((state, batch, key), device)
    jitted = jax.jit(functools.partial(step_fn, num_shards=num_shards, axis_name=None))
    lowered = jitted.lower(state, batch, key)
    if source == "compiled":
        options = None if jax.default_backend() == "cpu" else {"xla_gpu_autotune_level": 0}
        try:
            return cost_flops(lowered.compile(compiler_options=options)), "compiled"
        except Exception:  # e.g. an option this backend does not know: count the HLO
            if options is None:
                raise
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", math.nan)), "lowered"


def memory_bytes(compiled) -> dict[str, float]:
    """The compiled executable's memory analysis: arguments, outputs, temporaries and peak.

    Peak is ``arguments + outputs + temporaries - aliased`` (donated buffers reused for the
    outputs count once), per device.
    """
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {"compiled_peak_bytes": math.nan}
    get = functools.partial(getattr, analysis)
    args, out = get("argument_size_in_bytes"), get("output_size_in_bytes")
    temp, alias = get("temp_size_in_bytes"), get("alias_size_in_bytes")
    return {
        "compiled_argument_bytes": float(args),
        "compiled_output_bytes": float(out),
        "compiled_temp_bytes": float(temp),
        "compiled_peak_bytes": float(args + out + temp - alias),
    }


def process_memory() -> dict[str, float]:
    """The process's max RSS and, on accelerators, the device's peak bytes in use."""
    out = {
        "process_max_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    }
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # memory_stats is not implemented on every backend
        stats = {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = float(stats["peak_bytes_in_use"])
    return out


# ------------------------------------------------------------------------------ benchmarks


def timed(fn: Callable[[int], Any]) -> Callable[[int], float]:
    """``fn(i)`` as a call that returns its seconds (``fn`` waits for its own results)."""

    def call(i: int) -> float:
        t0 = time.perf_counter()
        fn(i)
        return time.perf_counter() - t0

    return call


def alternate(
    calls: dict[str, Callable[[int], float]], count: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Call each of ``calls`` in turn (``call(i)`` returns its seconds) ``warmup + count``
    times, so that a machine shared with other work slows them alike; the timed calls'
    seconds per name."""
    times = {name: [] for name in calls}
    for i in range(warmup + count):
        for name, call in calls.items():
            elapsed = call(i)
            if i >= warmup:
                times[name].append(elapsed)
    return times


def median(times) -> float:
    """The median of a sequence of seconds."""
    return float(np.median(np.asarray(times)))


def compile_timed(jitted, *args, **kwargs) -> tuple[Any, float]:
    """``(jitted.lower(*args, **kwargs).compile(), seconds it took)``."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - t0


def compile_train_step(
    model: VDM,
    mode: str,
    host_state: training_steps.TrainState,
    host_batch: dict[str, np.ndarray],
    key: jax.Array,
    *,
    steps_per_dispatch: int = 1,
    num_devices: int | None = None,
) -> dict[str, Any]:
    """Our train step (``vdm_jax.training.parallel``) compiled in ``mode``, with its state.

    Returns:
      a run: {"dp", "state" (on the devices), "compiled", "compile_s", "key",
      "steps_per_dispatch"}, for :func:`dispatch_train_step`.
    """
    k = steps_per_dispatch
    dp = parallel.DataParallel(mode, parallel.make_mesh(num_devices))
    dp.check_batch_size(host_batch["image"].shape[-4])
    train_step = training_steps.make_train_step(model, training_steps.make_optimizer(), 0.9999)
    state = dp.put_state(host_state)
    t0 = time.perf_counter()
    compiled = (
        dp.compile_train_step(train_step, k)
        .lower(state, dp.put_batch(host_batch, stacked=k > 1), key)
        .compile()
    )
    return {"dp": dp, "state": state, "compiled": compiled, "key": key,
            "compile_s": time.perf_counter() - t0, "steps_per_dispatch": k}  # fmt: skip


def dispatch_train_step(run: dict[str, Any], host_batch: dict[str, np.ndarray]) -> float:
    """One call of a run of :func:`compile_train_step`: the batch put on the devices, the
    step, the metrics waited for, as a training loop does. Returns seconds per step."""
    dp, k = run["dp"], run["steps_per_dispatch"]
    t0 = time.perf_counter()
    run["state"], metrics = run["compiled"](
        run["state"], dp.put_batch(host_batch, stacked=k > 1), run["key"]
    )
    block(metrics)
    return (time.perf_counter() - t0) / k


def bench_train_steps(
    *,
    modes: tuple[str, ...] = ("jit",),
    n_layer: int,
    n_embd: int,
    resolution: int,
    channels: int = 3,
    batch: int,
    steps: int,
    dtype: str = "float32",
    steps_per_dispatch: int = 1,
    num_devices: int | None = None,
    dropout_rate: float = 0.1,
    formulation: str = "plain",
    fields: dict[str, Any] | None = None,
    warmup: int = 1,
    seed: int = 0,
    flops_source: str = "compiled",
) -> dict[str, dict[str, Any]]:
    """Compile the train step (``vdm_jax.training.parallel``) in each mode; time it on fake data.

    With several modes, their dispatches alternate (jit, pmap, jit, pmap, ...), so that a
    machine shared with other work slows them alike. Each timed dispatch includes putting a host
    batch on the devices and waiting for the metrics, as a training loop does. ``step_s`` is
    the median dispatch time divided by ``steps_per_dispatch``.

    ``fields`` are further model fields (see :func:`build_model`), e.g. ``{"remat": True}``.

    Returns:
      {mode: dict with images_per_sec, step_s, step_s_mean, step_s_min, compile_s,
      flops_per_step and flops_source (see :func:`step_flops`; "none" skips it), the compiled
      executable's memory, the process's max RSS and the settings}.
    """
    k = steps_per_dispatch
    fields = fields or {}
    model = build_model(n_layer, n_embd, dtype, dropout_rate, formulation=formulation, **fields)
    host_batches = synthetic_batches(2, batch, resolution, channels, seed, steps=k if k > 1 else 0)
    host_state = init_state(model, (resolution, resolution, channels), seed)
    n_params = sum(x.size for x in jax.tree.leaves(host_state.params))
    key = jax.random.key(seed + 1)
    runs = {
        mode: compile_train_step(model, mode, host_state, host_batches[0], key,
                                 steps_per_dispatch=k, num_devices=num_devices)
        for mode in modes
    }  # fmt: skip
    flops_per_step, source = math.nan, "none"
    if flops_source != "none":
        first = jax.tree.map(lambda x: x[0], host_batches[0]) if k > 1 else host_batches[0]
        num_shards = runs[modes[0]]["dp"].num_shards
        flops_per_step, source = step_flops(
            n_layer, n_embd, dtype, dropout_rate, host_state, first, key, num_shards, flops_source
        )

    dispatches = max(1, math.ceil(steps / k))
    calls = {
        mode: functools.partial(
            lambda run, i: dispatch_train_step(run, host_batches[i % len(host_batches)]), run
        )
        for mode, run in runs.items()
    }
    times = alternate(calls, dispatches, warmup)

    results = {}
    for mode, run in runs.items():
        t = np.array(times[mode])
        step_s = float(np.median(t))
        results[mode] = {
            "n_layer": n_layer,
            "n_embd": n_embd,
            "resolution": resolution,
            "channels": channels,
            "batch": batch,
            "dtype": dtype,
            "mode": mode,
            "formulation": formulation,
            **fields,
            "steps_per_dispatch": k,
            "num_devices": run["dp"].num_shards,
            "steps": dispatches * k,
            "params": int(n_params),
            "images_per_sec": batch / step_s,
            "step_s": step_s,
            "step_s_mean": float(np.mean(t)),
            "step_s_min": float(np.min(t)),
            "compile_s": run["compile_s"],
            "flops_per_step": flops_per_step,
            "flops_source": source,
            **memory_bytes(run["compiled"]),
            **process_memory(),
        }
    return results


def bench_eval(
    *,
    n_layer: int,
    n_embd: int,
    resolution: int,
    channels: int = 3,
    batch: int,
    batches: int,
    dtype: str = "float32",
    num_devices: int | None = None,
    formulation: str = "plain",
    seed: int = 0,
) -> dict[str, Any]:
    """Compile the evaluation bound (``parallel.compile_eval_step``) and time it."""
    model = build_model(n_layer, n_embd, dtype, formulation=formulation)
    dp = parallel.DataParallel("jit", parallel.make_mesh(num_devices))
    dp.check_batch_size(batch)
    params = dp.put_params(init_state(model, (resolution, resolution, channels), seed).params)
    host_batches = synthetic_batches(2, batch, resolution, channels, seed)
    key = jax.random.key(seed + 2)
    compiled, compile_s = compile_timed(
        dp.compile_eval_step(training_steps.make_eval_step(model)),
        params,
        dp.put_global_batch(host_batches[0]),
        key,
    )
    call = timed(lambda i: block(compiled(params, dp.put_global_batch(host_batches[i % 2]), key)))
    times = alternate({"eval": call}, max(1, batches))["eval"]
    batch_s = median(times)
    return {
        "batch": batch,
        "batches": len(times),
        "images_per_sec": batch / batch_s,
        "batch_s": batch_s,
        "compile_s": compile_s,
        **memory_bytes(compiled),
        **process_memory(),
    }


def bench_sampling(
    *,
    n_layer: int,
    n_embd: int,
    resolution: int,
    channels: int = 3,
    batch: int,
    num_steps: int = 1000,
    dtype: str = "float32",
    formulation: str = "plain",
    sampler: str = "ancestral",
    seed: int = 0,
) -> dict[str, Any]:
    """Compile ``vdm_jax.models.sampling.<sampler>_sample`` at ``num_steps`` steps, time one call.

    ``sampler`` names any sampler of :mod:`vdm_jax.models.sampling` that takes
    ``(model, params, key, *, shape, num_steps)``: "ancestral", "ddim", ...
    """
    sample = getattr(sampling, f"{sampler}_sample", None)
    if sample is None:
        raise ValueError(f"vdm_jax.models.sampling has no sampler {sampler!r} ({sampler}_sample)")
    model = build_model(n_layer, n_embd, dtype, formulation=formulation)
    shape = (batch, resolution, resolution, channels)
    params = init_state(model, shape[1:], seed).params
    variables = {"params": params}
    key = jax.random.key(seed + 3)
    compiled, compile_s = compile_timed(
        sample, model, variables, key, shape=shape, num_steps=num_steps
    )
    t0 = time.perf_counter()
    block(compiled(variables, key))
    run_s = time.perf_counter() - t0
    return {
        "sampler": sampler,
        "batch": batch,
        "num_steps": num_steps,
        "images_per_sec": batch / run_s,
        "seconds": run_s,
        "network_evals_per_sec": batch * num_steps / run_s,
        "compile_s": compile_s,
        **memory_bytes(compiled),
        **process_memory(),
    }
