"""Many devices and processes: fsdp layouts, and 2 processes on 127.0.0.1 (training, then an
evaluation pass) against 1 process.

The multi-process test starts the command line as separate processes (CPU devices, gloo
collectives over loopback), as a user would start it on each host.
"""

import json
import os
import socket

import jax
import numpy as np
import pytest

from vdm_jax.models.unet import ScoreUNet
from vdm_jax.models.vdm import VDM, make_schedule
from vdm_jax.training import checkpoint, parallel, steps

SMOKE = [
    "--config=digits:smoke",
    "--config.training.num_train_steps=3",
    "--config.training.log_every=1",
    "--config.training.checkpoint_every=3",
    "--config.training.batch_size=16",
    "--config.sampling.num_samples=4",
    "--config.sampling.sampling_steps=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finish(proc, timeout=420):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _restore_host(workdir):
    """The last checkpoint in ``workdir`` onto this process's first device."""
    import orbax.checkpoint as ocp

    directory = os.path.join(workdir, "checkpoints")
    step = max(int(name) for name in os.listdir(directory) if name.isdigit())
    meta = ocp.StandardCheckpointer().metadata(os.path.join(directory, str(step), "state"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta.item_metadata
    )
    with checkpoint.Checkpointer(
        directory, save_interval_steps=1, max_to_keep=1, read_only=True
    ) as ckpt:
        return ckpt.restore(abstract)


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path, cli):
    """Two command-line processes of 2 CPU devices each, against one process of 4. (The
    reference stays a process of its own: a run on 4 of the test process's 8 fake devices
    rounds differently from a process that has 4.)"""
    multi, single = tmp_path / "multi", tmp_path / "single"
    reference = cli.start(f"--workdir={single}", *SMOKE, devices=4)
    address = f"--coordinator_address=127.0.0.1:{_free_port()}"
    procs = [
        cli.start(f"--workdir={multi}", *SMOKE, address, "--num_processes=2",
                  f"--process_id={i}", devices=2)
        for i in range(2)
    ]  # fmt: skip
    outs = [_finish(p) for p in procs]
    _finish(reference)
    assert "process 1 of 2: 2 local devices of 4" in outs[1]
    ours, theirs = _metrics(multi), _metrics(single)
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == [1, 2, 3, 3]
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"steps_per_sec"}:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)
    # Only process 0 writes metrics and images; both checkpoints hold the same parameters.
    assert len(os.listdir(multi / "samples")) == 1
    a, b = _restore_host(multi), _restore_host(single)
    assert a.step == b.step == 3
    leaves = jax.tree_util.tree_leaves_with_path(a.state)
    for (path, x), y in zip(leaves, jax.tree.leaves(b.state), strict=True):
        # atol: leaves whose gradient is only rounding noise (values ~1e-7) differ by the
        # order of the cross-device sums, which the two layouts do differently.
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=5e-6, err_msg=jax.tree_util.keystr(path))
    # The data position is the same for both, so the 2-process run resumes on 1 process.
    assert a.data_state == b.data_state
    # The command line's evaluation over both processes (dense_vlb, K = 2, on 20 examples in
    # batches of 8, the last one padded), then the same pass of the 2-process checkpoint on 1
    # CPU device (here in this process, on 1 of its devices): the same figures to rounding.
    dense = ["--mode=eval", "--config.eval.estimator=dense_vlb", "--config.eval.num_draws=2",
             "--config.eval.num_examples=20", "--config.eval.batch_size=8"]  # fmt: skip
    address = f"--coordinator_address=127.0.0.1:{_free_port()}"
    for proc in [
        cli.start(f"--workdir={multi}", *SMOKE, *dense, address, "--num_processes=2",
                  f"--process_id={i}", devices=2)
        for i in range(2)
    ]:  # fmt: skip
        _finish(proc)
    two_processes, per_example_two = _metrics(multi)[-1], _eval_arrays(multi)
    cli.in_process(f"--workdir={multi}", *SMOKE, *dense, "--config.parallel.num_devices=1",
                   "--config.eval.recompute=True")  # fmt: skip
    evaluated = _metrics(multi)
    one_device, per_example_one = evaluated[-1], _eval_arrays(multi)
    assert len(evaluated) == len(ours) + 2 and one_device["step"] == two_processes["step"] == 3
    assert one_device["test/dense_vlb_num_examples"] == 20
    assert one_device.keys() == two_processes.keys()
    for key, value in one_device.items():
        assert value == pytest.approx(two_processes[key], rel=1e-5, abs=1e-6), key
    assert per_example_one.keys() == per_example_two.keys() and len(per_example_one) == 3
    for name, arrays in per_example_one.items():
        np.testing.assert_allclose(arrays["bpd"], per_example_two[name]["bpd"], rtol=1e-5)


def _eval_arrays(workdir):
    """The per-example arrays of the one evaluation pass in ``workdir/eval``, per batch file."""
    (folder,) = (workdir / "eval").iterdir()
    return {p.name: dict(np.load(p)) for p in sorted(folder.glob("batch_*"))}


def _tiny_vdm():
    net = ScoreUNet(n_layer=1, n_embd=16, dropout_rate=0.1)
    return VDM(score_net=net, schedule=make_schedule("learned_linear"), vocab_size=17)


def _train_three_steps(dp, state, batches):
    model = _tiny_vdm()
    step_fn = dp.compile_train_step(
        steps.make_train_step(model, steps.make_optimizer(), 0.9), state=state
    )
    state = dp.put_state(state)
    losses = []
    for batch in batches:
        state, metrics = step_fn(state, dp.put_batch(batch), jax.random.key(3))
        losses.append(float(metrics["bpd"]))
    return state, losses


@pytest.mark.slow
def test_fsdp_shards_the_large_arrays_and_matches_data_parallel(init_state):
    model = _tiny_vdm()
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 17, (16, 8, 8, 1), dtype=np.uint8)} for _ in range(3)]
    state = init_state(model, steps.make_optimizer(), jax.random.key(0), batches[0]["image"])
    dp = parallel.DataParallel("jit", parallel.make_mesh(8))
    # The mesh of the next test (2 x 4): the two tests share their compiled programs.
    fsdp = parallel.DataParallel("jit", parallel.make_mesh(8, data=2, fsdp=4), fsdp_min_size=1024)
    dp_state, dp_losses = _train_three_steps(dp, state, batches)
    fsdp_state, fsdp_losses = _train_three_steps(fsdp, state, batches)
    np.testing.assert_allclose(fsdp_losses, dp_losses, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(fsdp_state), jax.tree.leaves(dp_state), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)

    def per_device_bytes(tree, sharded):
        leaves = [x for x in jax.tree.leaves(tree) if (x.size >= 1024 and x.ndim >= 2) == sharded]
        return sum(x.addressable_shards[0].data.nbytes for x in leaves)

    for sharded in (True, False):
        full = per_device_bytes(dp_state.params, sharded)
        if sharded:  # the conv kernels: 4x less per device, and their Adam moments too
            assert full > 0 and per_device_bytes(fsdp_state.params, True) * 4 == full
            mu = fsdp_state.opt_state
            assert per_device_bytes(mu, True) * 4 == per_device_bytes(dp_state.opt_state, True)
        else:  # biases, norms and small layers stay whole on every device
            assert per_device_bytes(fsdp_state.params, False) == full


@pytest.mark.slow
def test_checkpoint_moves_between_data_parallel_and_fsdp(tmp_path, init_state):
    model = _tiny_vdm()
    rng = np.random.default_rng(1)
    batches = [{"image": rng.integers(0, 17, (16, 8, 8, 1), dtype=np.uint8)} for _ in range(2)]
    state = init_state(model, steps.make_optimizer(), jax.random.key(0), batches[0]["image"])
    dp = parallel.DataParallel("jit", parallel.make_mesh(8))
    trained, _ = _train_three_steps(dp, state, batches[:1])
    with checkpoint.Checkpointer(tmp_path / "ckpt", save_interval_steps=1, max_to_keep=1) as ckpt:
        ckpt.save(1, trained, data_state=None, config={}, force=True)
    fsdp = parallel.DataParallel("jit", parallel.make_mesh(8, data=2, fsdp=4), fsdp_min_size=1024)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        trained, fsdp.state_sharding(trained),
    )  # fmt: skip
    with checkpoint.Checkpointer(tmp_path / "ckpt", save_interval_steps=1, max_to_keep=1) as ckpt:
        restored = ckpt.restore(abstract)
    kernel = restored.state.params["score_net"]["down_block_0"]["conv1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    for x, y in zip(jax.tree.leaves(restored.state), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(x, y)
    # Training goes on from the restored layout as it would have gone on without the move.
    _, moved = _train_three_steps(fsdp, restored.state, batches[1:])
    _, stayed = _train_three_steps(dp, trained, batches[1:])
    np.testing.assert_allclose(moved, stayed, rtol=1e-5)


def test_mesh_shapes_and_errors():
    assert parallel.mesh_shape(8) == (8, 1)
    assert parallel.mesh_shape(8, data=2, fsdp=-1) == (2, 4)
    assert parallel.mesh_shape(8, data=-1, fsdp=4) == (2, 4)
    with pytest.raises(ValueError, match=r"at most one of parallel\.data and parallel\.fsdp"):
        parallel.mesh_shape(8, data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="do not split into a mesh axis of size 3"):
        parallel.mesh_shape(8, fsdp=3)
    with pytest.raises(ValueError, match="data=2 x fsdp=2 needs 4 devices, but 8"):
        parallel.mesh_shape(8, data=2, fsdp=2)
    with pytest.raises(ValueError, match=r"parallel\.fsdp must be -1"):
        parallel.mesh_shape(8, fsdp=0)
    mesh = parallel.make_mesh(8, fsdp=2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    with pytest.raises(ValueError, match="fsdp=2 needs mode='jit'"):
        parallel.DataParallel("pmap", mesh)
    spec = parallel.fsdp_partition_spec
    assert spec((3, 3, 64, 128), 8) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert spec((3, 3, 128, 12), 8, min_size=1) == jax.sharding.PartitionSpec(
        None, None, "fsdp", None
    )
    assert spec((128,), 8, min_size=1) == jax.sharding.PartitionSpec()  # vectors stay whole
    assert spec((3, 3, 8, 8), 8) == jax.sharding.PartitionSpec()  # small
    assert spec((7, 9), 8, min_size=1) == jax.sharding.PartitionSpec()  # nothing divisible
    assert parallel.initialize_distributed() is False  # one process: nothing to start
    with pytest.raises(ValueError, match="needs coordinator_address, num_processes and"):
        parallel.initialize_distributed("127.0.0.1:1234")


def test_initialize_distributed_reads_and_checks_the_environment(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        parallel.initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 2"):
        parallel.initialize_distributed()
