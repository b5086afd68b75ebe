"""Checkpoints (vdm_jax.training.checkpoint) and preemption (vdm_jax.training.preemption):
round trips, the save policy, resharding, damage, failed writes, SIGTERM."""

import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vdm_jax.errors import UserError
from vdm_jax.training import checkpoint
from vdm_jax.training.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointSaveError,
    Restored,
    check_compatible,
)
from vdm_jax.training.preemption import PreemptionWatcher

# After a failed tensorstore read, orbax's asyncio helpers report "Event loop is closed" when
# garbage-collected (in whichever test runs then); harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CONFIG = {"model": {"n_embd": 128, "sizes": (1, 2)}, "data": {"name": "digits"}, "seed": 0}
# grain's DataLoaderIterator.get_state() is json.dumps(state, indent=4).encode().
GRAIN_STATE = json.dumps({"last_seen_indices": {"0": 41}, "last_worker_index": -1}, indent=4)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: optax.OptState


def _mesh(n):
    return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])


def _shardings(tree, mesh):
    # Matrices sharded along their first axis, everything else replicated.
    return jax.tree.map(lambda x: NamedSharding(mesh, P("data") if x.ndim == 2 else P()), tree)


def _abstract(tree, mesh):
    shapes = jax.eval_shape(lambda: tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes,
        _shardings(shapes, mesh),
    )


def _state(mesh, scale=1.0):
    params = {
        "dense": {
            "kernel": jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) * scale,
            "bias": jnp.linspace(-1.0, 1.0, 8) * scale,
        },
        "gamma": {"w": jnp.float32(0.5 * scale)},
    }
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    state = TrainState(
        step=jnp.int32(7),
        params=params,
        ema_params=jax.tree.map(lambda x: 0.5 * x, params),
        opt_state=opt_state,
    )
    return jax.device_put(state, _shardings(state, mesh))


def _assert_same(restored, expected, mesh=None):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.dtype == b.dtype
    if mesh is not None:
        for a, s in zip(
            jax.tree.leaves(restored), jax.tree.leaves(_shardings(expected, mesh)), strict=True
        ):
            assert a.sharding.is_equivalent_to(s, a.ndim)
            assert len(a.sharding.device_set) == mesh.size


def _listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in Path(root).rglob("*"))


def _save_steps(path, steps, mesh, **kwargs):
    ckpt = Checkpointer(path, save_interval_steps=1, max_to_keep=kwargs.pop("max_to_keep", 5))
    for s in steps:
        ckpt.save(s, _state(mesh, scale=s), data_state=GRAIN_STATE.encode(), config=CONFIG)
    ckpt.close()


@pytest.fixture
def mesh8():
    return _mesh(8)


# -- round trips --------------------------------------------------------------------------


def test_round_trip_state_data_state_and_config(tmp_path, mesh8):
    state = _state(mesh8)
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=5) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.restore(_abstract(state, mesh8)) is None
        assert ckpt.save(1, state, data_state=GRAIN_STATE.encode(), config=CONFIG)
        assert ckpt.save(2, state, data_state={"epoch": 3, "pos": [1, 2]}, config=CONFIG)
        assert ckpt.save(4, state, data_state=None, config=CONFIG)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 2, 4]

        restored = ckpt.restore(_abstract(state, mesh8), step=1)
        assert isinstance(restored, Restored)
        assert restored.step == 1
        assert isinstance(restored.state, TrainState)
        _assert_same(restored.state, state, mesh8)
        assert restored.data_state == GRAIN_STATE.encode()  # byte for byte
        assert restored.config == json.loads(json.dumps(CONFIG))  # the tuple comes back a list
        assert ckpt.restore(_abstract(state, mesh8), step=2).data_state == {
            "epoch": 3,
            "pos": [1, 2],
        }
        latest = ckpt.restore(state)  # concrete arrays work as the target too
        assert latest.step == 4 and latest.data_state is None
        _assert_same(latest.state, state, mesh8)
    # The data state is one readable JSON file, whatever the number of processes.
    assert "last_seen_indices" in (tmp_path / "1" / "data_state" / "metadata").read_text()


def test_real_grain_iterator_resumes_exactly(tmp_path, mesh8):
    grain = pytest.importorskip("grain")
    source = list(range(40))

    def make_iter():
        sampler = grain.samplers.IndexSampler(
            num_records=len(source), shuffle=True, seed=3, num_epochs=None
        )
        loader = grain.DataLoader(
            data_source=source,
            sampler=sampler,
            operations=[grain.transforms.Batch(batch_size=4)],
            worker_count=0,
        )
        return iter(loader)

    it = make_iter()
    for _ in range(3):
        next(it)
    state = _state(mesh8)
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2) as ckpt:
        ckpt.save(3, state, data_state=it.get_state(), config=CONFIG)
        expected = [np.asarray(next(it)) for _ in range(3)]
        restored = ckpt.restore(_abstract(state, mesh8))
    fresh = make_iter()
    fresh.set_state(restored.data_state)
    for want in expected:
        np.testing.assert_array_equal(np.asarray(next(fresh)), want)


def test_save_interval_keep_n_and_no_overwrite(tmp_path, mesh8):
    state = _state(mesh8)
    with Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2, async_save=False) as ckpt:
        saved = [ckpt.save(s, state, data_state=None, config=CONFIG) for s in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        assert ckpt.all_steps() == [4, 6]
        assert ckpt.save(7, state, data_state=None, config=CONFIG, force=True)
        assert ckpt.all_steps() == [6, 7]
        # Never at or behind an existing step, even when forced.
        assert not ckpt.save(7, state, data_state=None, config=CONFIG, force=True)
        assert not ckpt.save(6, state, data_state=None, config=CONFIG, force=True)
        assert not ckpt.save(4, state, data_state=None, config=CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["6", "7"]


def test_interval_counts_steps_passed_not_multiples_hit(tmp_path, mesh8):
    # A loop advancing 3 steps per call never sees step 4 or 8: it saves once past them.
    state = _state(mesh8)
    with Checkpointer(tmp_path, save_interval_steps=4, max_to_keep=None, async_save=False) as ckpt:
        saved = [s for s in range(3, 25, 3) if ckpt.save(s, state, data_state=None, config=CONFIG)]
        assert saved == ckpt.all_steps() == [6, 9, 12, 18, 21, 24]
        assert not ckpt.should_save(25) and ckpt.should_save(28)


def test_async_save_completes_and_restore_sees_it(tmp_path, mesh8):
    state = _state(mesh8, scale=3.0)
    expected = jax.tree.map(np.asarray, state)
    ckpt = Checkpointer(tmp_path, save_interval_steps=10, max_to_keep=3, async_save=True)
    assert ckpt.save(10, state, data_state=None, config=CONFIG)
    assert ckpt.latest_step() == 10  # tracked while the write is in flight
    # save() has copied the arrays to host: the training loop may donate/delete them.
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    restored = ckpt.restore(_abstract(expected, mesh8))  # waits for the write itself
    assert restored.step == 10
    _assert_same(restored.state, expected)
    ckpt.close()
    # A new checkpointer (a restarted job) finds it on disk.
    with Checkpointer(tmp_path, save_interval_steps=10, max_to_keep=3) as again:
        assert again.all_steps() == [10]
        _assert_same(again.restore(_abstract(expected, mesh8)).state, expected)


@pytest.mark.parametrize(("n_save", "n_restore"), [(8, 1), (1, 4)])
def test_restore_onto_a_different_number_of_devices(tmp_path, n_save, n_restore):
    state = _state(_mesh(n_save), scale=2.0)
    kernel = state.params["dense"]["kernel"]
    assert len(kernel.sharding.device_set) == n_save
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1) as ckpt:
        ckpt.save(5, state, data_state=None, config=CONFIG)
        target = _mesh(n_restore)
        restored = ckpt.restore(_abstract(state, target)).state
    _assert_same(restored, state, target)
    kernel = restored.params["dense"]["kernel"]  # sharded along axis 0
    assert {s.data.shape for s in kernel.addressable_shards} == {(16 // n_restore, 8)}
    bias = restored.params["dense"]["bias"]  # replicated
    assert {s.data.shape for s in bias.addressable_shards} == {(8,)}
    assert bias.sharding.is_fully_replicated


def test_abstract_state_needs_shardings(tmp_path, mesh8):
    state = _state(mesh8)
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1) as ckpt:
        ckpt.save(1, state, data_state=None, config=CONFIG)
        with pytest.raises(
            ValueError, match=r"without a concrete sharding: .*kernel.*AbstractMesh"
        ):
            ckpt.restore(jax.eval_shape(lambda: state))
        with pytest.raises(UserError, match=r"no checkpoint for step 9 .*steps: \[1\]"):
            ckpt.restore(_abstract(state, mesh8), step=9)


# -- damage -------------------------------------------------------------------------------


def _array_files(step_dir):
    # OCDBT data files: the merged root database's and each process's (which of them hold
    # an array's bytes depends on its size; damage to an unreferenced copy is harmless).
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    return files


def _truncate_array_files(step_dir):
    for p in _array_files(step_dir):
        os.truncate(p, p.stat().st_size // 2)


def _delete_array_files(step_dir):
    for p in _array_files(step_dir):
        p.unlink()


def _delete_state_folder(step_dir):
    shutil.rmtree(step_dir / "state")


def _truncate_config(step_dir):
    path = step_dir / "config" / "metadata"
    os.truncate(path, 5)


def _truncate_tree_metadata(step_dir):
    path = step_dir / "state" / "_METADATA"
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {
    "truncated array files": (_truncate_array_files, "OUT_OF_RANGE|reading"),
    "deleted array files": (_delete_array_files, "reading|NOT_FOUND"),
    "missing item folder": (_delete_state_folder, r"missing item folder\(s\) \['state'\]"),
    "truncated config": (_truncate_config, "config unreadable"),
    "truncated tree metadata": (_truncate_tree_metadata, "JSONDecodeError"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_falls_back_to_previous(tmp_path, mesh8, caplog, damage):
    _save_steps(tmp_path, [1, 2], mesh8)
    damage_fn, reason = DAMAGE[damage]
    damage_fn(tmp_path / "2")
    good_before = _listing(tmp_path / "1")
    expected = _state(mesh8, scale=1)
    with (
        caplog.at_level(logging.WARNING),
        Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2) as ckpt,
    ):
        assert ckpt.latest_step() == 2
        restored = ckpt.restore(_abstract(expected, mesh8))
        assert restored.step == 1
        _assert_same(restored.state, expected, mesh8)
        assert restored.data_state == GRAIN_STATE.encode()
        # The bad step is moved aside, not deleted; the good one is untouched.
        assert ckpt.all_steps() == [1]
        assert _listing(tmp_path / "1") == good_before
        moved = [p for p in tmp_path.iterdir() if p.name.startswith("2.corrupt-")]
        assert len(moved) == 1 and any(moved[0].iterdir())
        # The run can go on and write step 2 again.
        assert ckpt.save(2, restored.state, data_state=None, config=CONFIG)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 2]
    text = caplog.text
    assert "step 2" in text and "cannot be restored" in text
    assert any(re.search(reason, r.getMessage()) for r in caplog.records), text
    assert "moved them aside" in text and "2.corrupt-" in text


def test_unfinished_save_folder_is_ignored_and_kept(tmp_path, mesh8, caplog):
    _save_steps(tmp_path, [1], mesh8)
    tmp = tmp_path / "2.orbax-checkpoint-tmp"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "_METADATA").write_text('{"tree_meta')
    expected = _state(mesh8, scale=1)
    with (
        caplog.at_level(logging.WARNING),
        Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2) as ckpt,
    ):
        assert ckpt.all_steps() == [1]
        assert ckpt.restore(_abstract(expected, mesh8)).step == 1
    assert tmp.is_dir()
    assert "2.orbax-checkpoint-tmp" in caplog.text and "unfinished" in caplog.text


def test_only_checkpoint_damaged_raises_and_changes_nothing(tmp_path, mesh8):
    _save_steps(tmp_path, [1], mesh8)
    _truncate_array_files(tmp_path / "1")
    before = _listing(tmp_path)
    expected = _state(mesh8)
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1) as ckpt:
        with pytest.raises(CheckpointCorruptError, match=r"step 1: .*Nothing was deleted"):
            ckpt.restore(_abstract(expected, mesh8))
        assert ckpt.all_steps() == [1]
    assert _listing(tmp_path) == before
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1) as ckpt:
        with pytest.raises(CheckpointCorruptError, match=str(tmp_path)):
            ckpt.restore(_abstract(expected, mesh8))
    assert _listing(tmp_path) == before


def test_mismatched_target_is_not_taken_for_damage(tmp_path, mesh8):
    _save_steps(tmp_path, [1, 2], mesh8)
    before = _listing(tmp_path)
    wrong = _abstract(_state(mesh8), mesh8).replace(
        step=jax.ShapeDtypeStruct((3,), jnp.int32, sharding=NamedSharding(mesh8, P()))
    )
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=5) as ckpt:
        with pytest.raises(CheckpointCorruptError, match=r"step 2: .*step 1: .*shape"):
            ckpt.restore(wrong)
    assert _listing(tmp_path) == before


# -- config compatibility -----------------------------------------------------------------


def test_check_compatible_lists_every_difference():
    saved = {"model": {"n_embd": 128, "sizes": [1, 2]}, "data": {"name": "mnist"}, "lr": 1e-3}
    this = {"model": {"n_embd": 64, "sizes": (1, 2)}, "data": {"name": "cifar10"}, "lr": 2e-3}
    check_compatible(saved, this, ["model.sizes"])  # a tuple equals the saved list
    check_compatible(saved, this, [])
    with pytest.raises(UserError) as info:
        check_compatible(
            saved, this, ["model.n_embd", "data.name", "model.sizes", "model.depth"],
            source="checkpoint at /w/ckpt/200",
        )  # fmt: skip
    msg = str(info.value)
    assert msg.startswith("checkpoint at /w/ckpt/200 was written with model.n_embd=128")
    assert "model.n_embd=128 (this run has 64)" in msg
    assert "data.name='mnist' (this run has 'cifar10')" in msg
    assert "model.sizes" not in msg and "model.depth" not in msg  # missing in both: equal
    with pytest.raises(UserError, match=r"model.depth=<missing> \(this run has 4\)"):
        check_compatible(saved, {**this, "model": {"depth": 4}}, ["model.depth"])
    with pytest.raises(UserError, match=r"model.n_embd=128 \(this run has 64\)"):
        check_compatible(saved, this, "model.n_embd")  # one key
    # A field added since the checkpoint was written stands for its default there.
    added = {**this, "model": {"network": "unet"}}
    check_compatible(saved, added, ["model.network"], saved_defaults={"model": {"network": "unet"}})
    with pytest.raises(UserError, match=r"model.network='unet' \(this run has 'mine'\)"):
        check_compatible(
            saved, {**this, "model": {"network": "mine"}}, ["model.network"],
            saved_defaults={"model": {"network": "unet"}},
        )  # fmt: skip


def test_restore_checks_config_before_reading_state(tmp_path, mesh8):
    _save_steps(tmp_path, [1], mesh8)
    before = _listing(tmp_path)
    other = {**CONFIG, "model": {"n_embd": 64, "sizes": (1, 2)}}
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1) as ckpt:
        with pytest.raises(UserError, match=r"checkpoint at .*1 was written with model.n_embd"):
            ckpt.restore(
                _abstract(_state(mesh8), mesh8), config=other, compatible_keys=["model.n_embd"]
            )
        ok = ckpt.restore(
            _abstract(_state(mesh8), mesh8), config=CONFIG, compatible_keys=["model.n_embd"]
        )
        assert ok.step == 1
    assert _listing(tmp_path) == before


# -- preemption ---------------------------------------------------------------------------


def test_preemption_watcher_sets_flag_on_sigterm_and_restores_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as watcher:
        assert signal.getsignal(signal.SIGTERM) is not previous
        assert not watcher.received and not watcher.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while not watcher.received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.received
        assert watcher.should_stop(1)
    assert signal.getsignal(signal.SIGTERM) is previous
    watcher.close()  # idempotent
    assert signal.getsignal(signal.SIGTERM) is previous


# -- bad directories and arguments --------------------------------------------------------


def test_directory_that_is_a_file_or_cannot_be_created(tmp_path):
    a_file = tmp_path / "ckpt"
    a_file.write_text("not a folder")
    with pytest.raises(UserError, match=f"{a_file} exists and is not a directory"):
        Checkpointer(a_file, save_interval_steps=1, max_to_keep=1)
    with pytest.raises(
        UserError, match=f"Cannot create or write checkpoint directory {a_file}/sub"
    ):
        Checkpointer(a_file / "sub", save_interval_steps=1, max_to_keep=1)
    assert a_file.read_text() == "not a folder"


def test_directory_not_writable(tmp_path):
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    immutable = False
    if os.access(folder, os.W_OK):  # root: make the folder immutable instead, if possible
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
        immutable = done.returncode == 0
        if not immutable:
            folder.chmod(0o700)
            pytest.skip("root without chattr: cannot make a folder read-only")
    try:
        with pytest.raises(
            UserError,
            match=f"Cannot create or write checkpoint directory {folder}: ",
        ):
            Checkpointer(folder, save_interval_steps=1, max_to_keep=1)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=False)
        folder.chmod(0o700)


def test_read_only_and_bad_arguments(tmp_path, mesh8):
    missing = tmp_path / "nothing here"
    with Checkpointer(missing, save_interval_steps=1, max_to_keep=None, read_only=True) as ckpt:
        assert ckpt.restore(_abstract(_state(mesh8), mesh8)) is None
        with pytest.raises(RuntimeError, match="read-only"):
            ckpt.save(1, _state(mesh8), data_state=None, config=CONFIG)
    assert not missing.exists()
    with pytest.raises(UserError, match="save_interval_steps"):
        Checkpointer(tmp_path, save_interval_steps=0, max_to_keep=1)
    with pytest.raises(UserError, match="max_to_keep"):
        Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=0)
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1) as ckpt:
        with pytest.raises(TypeError, match="config cannot be stored as JSON"):
            ckpt.save(1, _state(mesh8), data_state=None, config={"f": object()})
        with pytest.raises(TypeError, match="data_state cannot be stored as JSON"):
            ckpt.save(1, _state(mesh8), data_state={"f": object()}, config=CONFIG)
        with pytest.raises(TypeError, match="data_state cannot be stored as JSON"):
            ckpt.save(1, _state(mesh8), data_state=b"\xff", config=CONFIG)
        assert ckpt.all_steps() == []


# -- failed writes ------------------------------------------------------------------------


def test_failed_write_raises_save_error_and_keeps_the_previous_step(tmp_path, mesh8, monkeypatch):
    import errno

    real_write = checkpoint.write_text

    def full_disk_at_step_2(path, text):
        if "/2.orbax-checkpoint-tmp" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, text)

    monkeypatch.setattr(checkpoint, "write_text", full_disk_at_step_2)
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1) as ckpt:
        ckpt.save(1, _state(mesh8, scale=1), data_state=None, config=CONFIG)
        ckpt.save(2, _state(mesh8, scale=2), data_state=None, config=CONFIG)  # in the background
        with pytest.raises(CheckpointSaveError) as info:
            ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1]  # max_to_keep=1, yet 1 is kept: 2 never completed
    message = str(info.value)
    assert message.startswith(f"Could not write the checkpoint for step 2 in {tmp_path}: ")
    assert "No space left on device (ENOSPC)" in message and "(latest: step 1)" in message
    assert any(p.name.startswith("2.orbax-checkpoint-tmp") for p in tmp_path.iterdir())

    # Step 1 restores; with space again, step 2 is written over the unfinished folder.
    monkeypatch.setattr(checkpoint, "write_text", real_write)
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1) as ckpt:
        restored = ckpt.restore(_abstract(_state(mesh8), mesh8))
        assert restored.step == 1
        _assert_same(restored.state, _state(mesh8, scale=1), mesh8)
        assert ckpt.save(2, _state(mesh8, scale=2), data_state=None, config=CONFIG)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2]
        _assert_same(ckpt.restore(_abstract(_state(mesh8), mesh8)).state, _state(mesh8, scale=2))


def test_write_error_names_the_os_error_inside_a_tensorstore_message(tmp_path, mesh8, monkeypatch):
    def tensorstore_disk_full(path, text):
        raise ValueError(
            f'RESOURCE_EXHAUSTED: Error writing local file "{path}": ' + "z" * 400
            + " No space left on device [os_error_code='28']"
        )  # fmt: skip

    monkeypatch.setattr(checkpoint, "write_text", tensorstore_disk_full)
    ckpt = Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1, async_save=False)
    with pytest.raises(CheckpointSaveError) as info:
        ckpt.save(1, _state(mesh8), data_state=None, config=CONFIG)
        ckpt.close()
    message = str(info.value)
    assert "step 1" in message and "none yet" in message, message
    assert "No space left on device (ENOSPC); ValueError: RESOURCE_EXHAUSTED" in message
    assert len(message) < 1000  # tensorstore's long text is cut


def test_partial_read_only_restore_reads_the_target_and_moves_nothing(tmp_path, mesh8, caplog):
    """Only the arrays asked for and no data position; a reader leaves damaged steps alone."""
    _save_steps(tmp_path, [1, 2], mesh8)
    _delete_state_folder(tmp_path / "2")
    before = _listing(tmp_path)
    expected = {"ema_params": _state(mesh8, scale=1).ema_params}
    with (
        caplog.at_level(logging.WARNING),
        Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=None, read_only=True) as ckpt,
    ):
        restored = ckpt.restore(_abstract(expected, mesh8), partial=True)
    assert restored.step == 1 and restored.data_state is None
    _assert_same(restored.state, expected, mesh8)
    assert _listing(tmp_path) == before
    assert "left in place: read-only" in caplog.text
