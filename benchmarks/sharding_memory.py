"""Per-device memory of the train step, data-parallel against fsdp, from XLA's memory analysis.

    python benchmarks/sharding_memory.py                 # the cifar10 model on 8 devices
    python benchmarks/sharding_memory.py --devices 8 --fsdp 1,2,8 --n_layer 32 --n_embd 128 \
        --resolution 32 --channels 3 --batch 128 --dtype float32 --json out.json

For each fsdp size the step is compiled (not run) over a data x fsdp mesh of ``--devices``
devices, and one line per layout gives, per device: the state's bytes (parameters, EMA and
Adam moments, from their shardings), and the compiled executable's argument, output and
temporary bytes. On a CPU the devices are simulated with
``--xla_force_host_platform_device_count``; on accelerators the real ones are used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--fsdp", default="1,8", help="comma-separated fsdp sizes (1: data-parallel)")
    p.add_argument("--n_layer", type=int, default=32)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax  # after XLA_FLAGS
    import jax.numpy as jnp

    from benchmarks import common
    from vdm_jax.training import parallel, steps

    model = common.build_model(args.n_layer, args.n_embd, args.dtype)
    optimizer = steps.make_optimizer()
    step_fn = steps.make_train_step(model, optimizer, 0.9999)
    shape = (args.batch, args.resolution, args.resolution, args.channels)
    example = jnp.zeros((1, *shape[1:]), jnp.uint8)
    abstract = jax.eval_shape(
        lambda k: steps.init_state(model, optimizer, k, example), jax.random.key(0)
    )
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    results = []
    for fsdp in (int(f) for f in args.fsdp.split(",")):
        dp = parallel.DataParallel("jit", parallel.make_mesh(args.devices, fsdp=fsdp))
        shardings = dp.state_sharding(abstract)
        state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
        )
        batch = {"image": jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=dp.batch_sharding)}
        compiled = (
            dp.compile_train_step(step_fn, state=abstract)
            .lower(state, batch, jax.random.key(0))
            .compile()
        )
        memory = compiled.memory_analysis()
        state_bytes = sum(
            math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
            for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
        )
        result = {
            "devices": args.devices,
            "data": args.devices // fsdp,
            "fsdp": fsdp,
            "params": int(n_params),
            "batch": args.batch,
            "dtype": args.dtype,
            "state_bytes_per_device": int(state_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
            "temp_bytes": int(memory.temp_size_in_bytes),
            "backend": jax.default_backend(),
        }
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
