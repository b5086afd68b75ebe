"""Tests for vdm_jax.training.sources and vdm_jax.training.pipeline: sources (digits, arrays,
folders, tfds mock) and iterators."""

import io
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vdm_jax.errors import UserError
from vdm_jax.training import pipeline, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# Helpers.


def _id_source(n, shape=(2, 2, 1)):
    """n records whose label is their index and whose image is filled with index % 256."""
    images = np.broadcast_to(
        (np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, *shape)
    )
    return sources.array_source(images, np.arange(n))


def _take(it, k, key="label"):
    return [np.asarray(next(it)[key]).copy() for _ in range(k)]


def _write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _grey(value, h=4, w=3):
    return np.full((h, w), value, np.uint8)


# ---------------------------------------------------------------------------------------------
# Digits.


def test_digits_sizes_values_and_info():
    train, test = sources.digits_source("train"), sources.digits_source("test")
    assert len(train) == sources.DIGITS_NUM_TRAIN == 1500
    assert len(test) == sources.DIGITS_NUM_TEST == 297
    for src in (train, test):
        assert src.images.dtype == np.uint8 and src.images.shape[1:] == (8, 8, 1)
        assert src.images.min() == 0 and src.images.max() == 16
        assert src.labels.dtype == np.int32 and set(src.labels.tolist()) == set(range(10))
        assert src.info == sources.DatasetInfo("digits", (8, 8, 1), 17, 10)
    rec = train[5]
    assert rec["image"].shape == (8, 8, 1) and rec["image"].dtype == np.uint8
    assert rec["label"].dtype == np.int32 and np.ndim(rec["label"]) == 0
    assert sources.dataset_info("digits") == train.info
    assert sources.DIGITS_VOCAB_SIZE == train.info.vocab_size == 17


def test_digits_split_is_deterministic_partition():
    from sklearn.datasets import load_digits

    a, b = sources.digits_source("train"), sources.digits_source("test")
    again = sources.digits_source("train")
    np.testing.assert_array_equal(a.images, again.images)
    np.testing.assert_array_equal(a.labels, again.labels)
    # Train + test is the whole bundled set (as a multiset of image+label rows).
    ours = np.concatenate(
        [np.concatenate([s.images.reshape(len(s), -1), s.labels[:, None]], 1) for s in (a, b)]
    )
    digits = load_digits()
    theirs = np.concatenate([digits.images.reshape(-1, 64), digits.target[:, None]], 1)
    key = lambda x: sorted(map(tuple, x.astype(int).tolist()))  # noqa: E731
    assert key(ours) == key(theirs)
    # The split is a permutation, not the file order.
    assert not np.array_equal(a.labels[:20], digits.target[:20])


def test_digits_file_gives_load_digits_arrays_in_order(monkeypatch):
    from sklearn.datasets import load_digits

    from vdm_jax.training import digits_file

    digits = load_digits()
    assert digits_file.digits_csv_path() is not None  # else every run pays the import
    for found in (True, False):  # the file, and load_digits where the file is not found
        if not found:
            monkeypatch.setattr(digits_file, "digits_csv_path", lambda: None)
        images, labels = digits_file.read_digits()
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        np.testing.assert_array_equal(images, digits.images)
        np.testing.assert_array_equal(labels, digits.target)


@pytest.mark.slow
def test_a_fresh_interpreter_reads_the_digits_without_importing_scikit_learn(tmp_path):
    code = (
        "import sys; from vdm_jax.training import sources; sources.digits_source('test'); "
        "print('sklearn' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO))  # fmt: skip
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_digits_bad_split():
    with pytest.raises(ValueError, match="'validation'"):
        sources.digits_source("validation")


# ---------------------------------------------------------------------------------------------
# Arrays.


def test_array_source_nhw_and_nhwc():
    rng = np.random.default_rng(0)
    nhw = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    src = sources.array_source(nhw, np.arange(5) % 2)
    assert len(src) == 5 and src.info.image_shape == (3, 4, 1) and src.info.num_classes == 2
    np.testing.assert_array_equal(src[2]["image"][..., 0], nhw[2])
    assert src[-1]["label"] == 0 and src[-1]["label"].dtype == np.int32
    nhwc = rng.integers(0, 256, (4, 3, 3, 3), dtype=np.uint8)
    src = sources.array_source(nhwc)
    assert src.info == sources.DatasetInfo("arrays", (3, 3, 3), 256, 1)
    assert all(src[i]["label"] == 0 for i in range(4))
    with pytest.raises(IndexError):
        src[4]
    assert "num_records=4" in repr(src)


@pytest.mark.parametrize(
    ("images", "labels", "kwargs", "match"),
    [
        (np.zeros((3, 2, 2), np.float32), None, {}, "float32"),
        (np.zeros((3, 2), np.uint8), None, {}, r"\(3, 2\)"),
        (np.zeros((0, 2, 2), np.uint8), None, {}, "no images"),
        (np.zeros((3, 2, 2), np.uint8), np.zeros(4, int), {}, "3 images but 4 labels"),
        (np.zeros((3, 2, 2), np.uint8), np.zeros(3, float), {}, "float64"),
        (np.zeros((3, 2, 2), np.uint8), np.zeros((3, 1), int), {}, r"\(3, 1\)"),
        (np.zeros((3, 2, 2), np.uint8), np.array([0, -1, 0]), {}, "-1"),
        (np.full((3, 2, 2), 17, np.uint8), None, {"vocab_size": 17}, "17"),
        (np.zeros((3, 2, 2), np.uint8), None, {"vocab_size": 300}, "300"),
        (np.zeros((3, 2, 2), np.uint8), np.array([0, 5, 0]), {"num_classes": 3}, "5"),
    ],
)
def test_array_source_errors(images, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sources.array_source(images, labels, **kwargs)


# ---------------------------------------------------------------------------------------------
# Folders.


def test_folder_source_grey(tmp_path):
    _write_png(tmp_path / "train" / "dog" / "b.png", _grey(10))
    _write_png(tmp_path / "train" / "dog" / "a.PNG", _grey(20))
    _write_png(tmp_path / "train" / "cat" / "z.png", _grey(30))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    _write_png(tmp_path / "test" / "dog" / "c.png", _grey(40))
    _write_png(tmp_path / "test" / "emu" / "d.png", _grey(50))

    train = sources.folder_source(tmp_path, "train")
    # Classes are the union over splits, sorted: labels mean the same in both splits.
    assert train.classes == ("cat", "dog", "emu")
    assert [os.path.basename(f) for f in train.files] == ["z.png", "a.PNG", "b.png"]
    assert train.info == sources.DatasetInfo("folder", (4, 3, 1), 256, 3)
    recs = [train[i] for i in range(len(train))]
    assert [int(r["label"]) for r in recs] == [0, 1, 1]
    assert [int(r["image"][0, 0, 0]) for r in recs] == [30, 20, 10]
    assert all(r["image"].shape == (4, 3, 1) and r["image"].dtype == np.uint8 for r in recs)
    test = sources.folder_source(str(tmp_path), "test")
    assert [int(test[i]["label"]) for i in range(2)] == [1, 2]
    assert sources.make_source("folder", "test", data_dir=tmp_path).classes == test.classes
    assert sources.dataset_info("folder", data_dir=tmp_path) == train.info
    assert str(tmp_path) not in repr(train)  # stable across machines


def test_folder_source_colour_and_jpeg(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    _write_png(tmp_path / "train" / "a" / "rgb.png", rgb)
    _write_png(tmp_path / "train" / "a" / "grey.png", _grey(7, 5, 6))
    Image.fromarray(np.concatenate([rgb, np.full((5, 6, 1), 9, np.uint8)], -1)).save(
        tmp_path / "train" / "a" / "rgba.png"
    )
    Image.fromarray(rgb).save(tmp_path / "train" / "a" / "photo.jpeg", quality=95)
    src = sources.folder_source(tmp_path, "train")
    assert src.info.image_shape == (5, 6, 3)
    by_name = {os.path.basename(f): src[i]["image"] for i, f in enumerate(src.files)}
    np.testing.assert_array_equal(by_name["rgb.png"], rgb)
    np.testing.assert_array_equal(by_name["rgba.png"], rgb)  # alpha dropped
    np.testing.assert_array_equal(by_name["grey.png"], np.full((5, 6, 3), 7, np.uint8))
    assert by_name["photo.jpeg"].shape == (5, 6, 3)


def test_folder_source_missing_root_and_split(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        sources.folder_source(tmp_path / "nowhere", "train")
    _write_png(tmp_path / "train" / "a" / "x.png", _grey(1))
    with pytest.raises(ValueError, match=r"test"):
        sources.folder_source(tmp_path, "test")
    with pytest.raises(ValueError, match="'val'"):
        sources.folder_source(tmp_path, "val")
    with pytest.raises(ValueError, match="data_dir"):
        sources.make_source("folder", "train")


def test_folder_source_empty(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        sources.folder_source(tmp_path, "train")
    (tmp_path / "train" / "a").mkdir()
    (tmp_path / "train" / "a" / "readme.txt").write_text("x")
    _write_png(tmp_path / "train" / "loose.png", _grey(1))  # not in a class folder
    with pytest.raises(ValueError, match=r"no image files.*train"):
        sources.folder_source(tmp_path, "train")


def test_folder_source_mixed_sizes(tmp_path):
    _write_png(tmp_path / "train" / "a" / "small.png", _grey(1, 4, 3))
    _write_png(tmp_path / "train" / "b" / "big.png", _grey(1, 5, 3))
    with pytest.raises(ValueError, match=r"small\.png.*3x4.*big\.png.*3x5") as e:
        sources.folder_source(tmp_path, "train")
    assert str(tmp_path) in str(e.value)


def test_folder_source_corrupt_header(tmp_path):
    _write_png(tmp_path / "train" / "a" / "good.png", _grey(1))
    (tmp_path / "train" / "a" / "junk.png").write_bytes(b"this is not a png at all")
    with pytest.raises(ValueError, match=r"junk\.png"):
        sources.folder_source(tmp_path, "train")


def test_folder_source_truncated_pixels_fail_on_read(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(buf, "PNG")
    _write_png(tmp_path / "train" / "a" / "good.png", _grey(1, 64, 64))
    (tmp_path / "train" / "a" / "trunc.png").write_bytes(buf.getvalue()[:200])
    src = sources.folder_source(tmp_path, "train")  # headers are fine
    assert src[0]["image"].shape == (64, 64, 1)
    with pytest.raises(ValueError, match=r"trunc\.png"):
        src[1]


def test_folder_source_rejects_16_bit(tmp_path):
    _write_png(tmp_path / "train" / "a" / "deep.png", np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError, match=r"deep\.png.*mode"):
        sources.folder_source(tmp_path, "train")


# ---------------------------------------------------------------------------------------------
# TensorFlow Datasets (mock data; no TensorFlow, no download).


@pytest.mark.parametrize(("name", "shape"), [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
@pytest.mark.parametrize("policy", ["AUTO", "USE_CODE"])
def test_tfds_mock(name, shape, policy):
    with tfds.testing.mock_data(num_examples=9, policy=getattr(tfds.testing.MockPolicy, policy)):
        src = sources.make_source(name, "train")
        assert isinstance(src, sources.TfdsSource) and len(src) == 9
        assert src.info == sources.dataset_info(name) == sources.DatasetInfo(name, shape, 256, 10)
        rec = src[3]
        assert rec["image"].shape == shape and rec["image"].dtype == np.uint8
        assert rec["label"].dtype == np.int32 and np.ndim(rec["label"]) == 0
        assert 0 <= int(rec["label"]) < 10
        np.testing.assert_array_equal(src[3]["image"], rec["image"])  # deterministic
        it = pipeline.make_train_iterator(src, global_batch_size=4, seed=0)
        batch = next(it)
        assert batch["image"].shape == (4, *shape) and batch["label"].shape == (4,)
        batches = list(
            pipeline.make_eval_iterator(src, global_batch_size=4, process_count=1, process_index=0)
        )
        assert len(batches) == 3 and int(sum(b["mask"].sum() for b in batches)) == 9


def _imagenet_mock(shape, seen_splits):
    def as_data_source(self, split, **kwargs):
        seen_splits.append(split)
        rng = np.random.default_rng(0)
        return [{"image": rng.integers(0, 256, shape, dtype=np.uint8)} for _ in range(5)]

    return as_data_source


@pytest.mark.parametrize(("name", "side"), [("imagenet32", 32), ("imagenet64", 64)])
def test_tfds_imagenet_no_label_and_validation_split(name, side):
    seen = []
    mock = _imagenet_mock((side, side, 3), seen)
    with tfds.testing.mock_data(as_data_source_fn=mock):
        src = sources.tfds_source(name, "test")
        assert len(src) == 5 and src.tfds_split == "validation"
        rec = src[0]
        assert rec["image"].shape == (side, side, 3) and int(rec["label"]) == 0
        assert src.info == sources.DatasetInfo(name, (side, side, 3), 256, 1)
        sources.tfds_source(name, "train")
    assert seen == ["validation", "train"]


def test_tfds_wrong_image_shape_is_reported():
    # tfds' own mock draws random sizes for the ImageNet builders (declared (None, None, 3)).
    with tfds.testing.mock_data(as_data_source_fn=_imagenet_mock((41, 8, 3), [])):
        src = sources.tfds_source("imagenet32", "train")
        with pytest.raises(ValueError, match=r"\(41, 8, 3\)"):
            src[0]


def test_tfds_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'svhn'.*digits.*cifar10.*imagenet64.*folder"):
        sources.make_source("svhn", "train")
    with pytest.raises(ValueError, match=r"'svhn'.*cifar10"):
        sources.tfds_source("svhn", "train")
    with pytest.raises(ValueError, match="'svhn'"):
        sources.dataset_info("svhn")
    with pytest.raises(ValueError, match="missing"):
        sources.tfds_source("cifar10", "train", data_dir=tmp_path / "missing")
    # An existing but unprepared data_dir: tfds' own message is misleading; ours names the fix.
    with pytest.raises(ValueError, match=r"(?s)'cifar10'.*array_record"):
        sources.tfds_source("cifar10", "train", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Training iterator.


def _make(src, count=1, index=0, **kwargs):
    kwargs = {"global_batch_size": 4, "seed": 3, **kwargs}
    return pipeline.make_train_iterator(src, process_index=index, process_count=count, **kwargs)


def _global_batches(src, count, k, state=None, **kwargs):
    """k global batches: batch i of processes 0..count-1, concatenated in process order."""
    per_process = []
    for index in range(count):
        it = _make(src, count, index, **kwargs)
        if state is not None:
            it.set_state(state)
        per_process.append([next(it) for _ in range(k)])
    return [
        {key: np.concatenate([p[i][key] for p in per_process]) for key in per_process[0][i]}
        for i in range(k)
    ]


def _reference_stream(n, seed, length, start=0):
    """Stream positions ``start .. start+length-1``, by the documented definition."""
    stream = grain.MapDataset.range(n).seed(seed).shuffle().repeat()
    return np.array([stream[i] for i in range(start, start + length)])


def _state_at(next_index, src=None, **kwargs):
    """A saved position at global batch ``next_index`` (default: 11 records, batch 4, seed 3)."""
    return {**_make(src or _id_source(11), **kwargs).get_state(), "next_index": next_index}


class _LoggingSource:
    """Wraps a source (not an ArraySource: records are read one at a time) and logs reads."""

    def __init__(self, source, fail_at=None):
        self.source, self.reads, self.fail_at = source, [], fail_at

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        if index == self.fail_at:
            self.fail_at = None
            raise OSError(f"cannot read record {index}")
        self.reads.append(index)
        return self.source[index]


_NO_THREADS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def test_train_batches_shapes_and_epochs():
    src = _id_source(12, shape=(3, 2, 1))
    it = pipeline.make_train_iterator(src, global_batch_size=4, seed=1)  # jax's 1 process
    assert isinstance(it, pipeline.TrainIterator) and iter(it) is it
    batch = next(it)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (4, 3, 2, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["label"])
    epoch1 = np.concatenate([batch["label"], *_take(it, 2)])
    epoch2 = np.concatenate(_take(it, 3))
    assert sorted(epoch1) == sorted(epoch2) == list(range(12))
    assert not np.array_equal(epoch1, epoch2)  # reshuffled each epoch
    assert not np.array_equal(epoch1, np.arange(12))


def test_train_seed_determinism():
    src = _id_source(30)
    a = _take(pipeline.make_train_iterator(src, global_batch_size=8, seed=5), 6)
    b = _take(pipeline.make_train_iterator(src, global_batch_size=8, seed=5), 6)
    c = _take(pipeline.make_train_iterator(src, global_batch_size=8, seed=6), 6)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))


@pytest.mark.parametrize("n", [12, 13, 3])
def test_train_global_batches_do_not_depend_on_process_count(n):
    k = 3 * -(-n // 4) + 2  # more than three epochs
    expected = _reference_stream(n, 3, 4 * k).reshape(k, 4)
    for count in (1, 2, 4):
        if count > n:
            continue  # fewer records than processes is refused (test_train_errors)
        batches = _global_batches(_id_source(n), count, k)
        labels = np.stack([b["label"] for b in batches])
        np.testing.assert_array_equal(labels, expected, err_msg=f"process_count={count}")
        for b in batches:
            np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"] % 256)
    # The stream is a sequence of permutations, a new one each epoch.
    stream = _reference_stream(n, 3, 4 * n)
    epochs = stream.reshape(4, n)
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    if n > 3:
        assert len({tuple(epoch) for epoch in epochs}) == len(epochs)


def test_train_each_process_reads_only_its_records():
    n, k = 10, 7  # 28 positions: crosses two epoch boundaries
    stream = _reference_stream(n, 3, 4 * k).reshape(k, 4)
    for index in range(2):
        src = _LoggingSource(_id_source(n))
        labels = np.concatenate(_take(_make(src, 2, index, read_options=_NO_THREADS), k))
        np.testing.assert_array_equal(labels, stream[:, 2 * index : 2 * index + 2].reshape(-1))
        assert src.reads == labels.tolist()


def test_train_threads_and_sources_do_not_change_batches():
    src = _id_source(23)
    # A record-by-record source with the default read options (16 threads, 32 batches ahead).
    a = _take(_make(_LoggingSource(src), 2, 1, global_batch_size=6), 12)
    b = _take(_make(src, 2, 1, global_batch_size=6), 12)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))


@pytest.mark.parametrize("threads", [0, 4])
def test_train_failed_read_is_retried(threads):
    src = _LoggingSource(_id_source(10), fail_at=int(_reference_stream(10, 3, 9)[8]))
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    it = _make(src, read_options=options)
    got, failures = [], []
    while len(got) < 6:
        try:
            got.append(next(it)["label"])
        except OSError:
            failures.append(it.next_batch_index)
    # Without threads batch 2 holds the first read of the record; threads may read it first
    # for a later batch (the same record comes back each epoch).
    assert len(failures) == 1 and (threads or failures == [2])
    np.testing.assert_array_equal(np.stack(got), np.stack(_take(_make(_id_source(10)), 6)))


def test_train_shuffle_false_is_in_order():
    batches = _global_batches(_id_source(10), 2, 6, shuffle=False)
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(24) % 10)


def test_train_num_epochs_drops_only_the_last_partial_batch():
    n = 10  # 3 epochs are 30 positions: 7 global batches of 4; the last 2 positions dropped
    for count in (1, 2):
        its = [_make(_id_source(n), count, i, num_epochs=3) for i in range(count)]
        labels = np.concatenate([np.stack(_take(it, 7)) for it in its], axis=1)
        np.testing.assert_array_equal(labels.reshape(-1), _reference_stream(n, 3, 28))
        for it in its:
            assert it.num_batches == 7
            with pytest.raises(StopIteration):
                next(it)


@pytest.mark.parametrize("consumed", [0, 3, 7])
def test_train_resume_across_process_counts(consumed):
    n, more = 11, 6
    src = _id_source(n)
    uninterrupted = _global_batches(src, 1, consumed + more)[consumed:]
    writers = [_make(src, 2, i) for i in range(2)]
    for it in writers:
        _take(it, consumed)  # 7 batches cross two epoch boundaries
    state = writers[0].get_state()
    assert state == writers[1].get_state()  # no trace of the process
    assert {k: v for k, v in state.items() if k != "format"} == {
        "next_index": consumed,
        "num_records": n,
        "seed": 3,
        "global_batch_size": 4,
        "shuffle": True,
        "augment": False,
    }
    saved = json.loads(json.dumps(state))  # as a JSON checkpoint item stores it
    for count in (1, 2, 4):
        resumed = _global_batches(src, count, more, state=saved)
        for want, got in zip(uninterrupted, resumed, strict=True):
            np.testing.assert_array_equal(got["label"], want["label"])
            np.testing.assert_array_equal(got["image"], want["image"])


def test_train_set_state_mid_run_and_far_ahead():
    src = _id_source(11)
    expected = _take(_make(src), 9)
    it = _make(src)
    _take(it, 2)
    it.set_state(_state_at(6))
    assert it.next_batch_index == 6
    np.testing.assert_array_equal(np.stack(_take(it, 3)), np.stack(expected[6:]))
    k = 10**12  # the position arithmetic stays exact far into the stream
    it.set_state(_state_at(k))
    np.testing.assert_array_equal(next(it)["label"], _reference_stream(11, 3, 4, start=4 * k))
    assert it.next_batch_index == k + 1


@pytest.mark.parametrize(
    ("source_size", "kwargs", "match"),
    [
        (11, {"seed": 4}, r"seed=3 in the saved state, seed=4 here"),
        (12, {}, r"num_records=11 in the saved state, num_records=12 here"),
        (11, {"global_batch_size": 8}, r"global_batch_size=4 .*global_batch_size=8 here"),
        (11, {"shuffle": False}, r"shuffle=True in the saved state, shuffle=False here"),
        (11, {"augment": True}, r"augment=False in the saved state, augment=True here"),
        (12, {"seed": 4}, r"num_records=11 .*; seed=3 .*seed=4 here"),
    ],
)
def test_train_set_state_mismatch(source_size, kwargs, match):
    it = _make(_id_source(source_size), 2, 0, **kwargs)
    with pytest.raises(UserError, match=rf"different input stream: .*{match}"):
        it.set_state(_state_at(5))
    assert it.next_batch_index == 0


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (b'{"next_batch": 3}', "not a position saved by make_train_iterator"),
        # What the grain DataLoader of earlier versions saved.
        ({"last_seen_indices": {"0": 41}, "last_worker_index": -1}, "not a position"),
        ([1, 2], "not a position"),
        # The previous order (format 1, numpy permutations) is another stream.
        (lambda s: {**s, "format": "vdm_jax.training.data.make_train_iterator/1"}, "format="),
        (lambda s: {k: v for k, v in s.items() if k != "seed"}, r"lacks \['seed'\]"),
        (lambda s: {k: v for k, v in s.items() if k != "next_index"}, r"lacks \['next_index'\]"),
        (lambda s: {**s, "next_index": -1}, "next_index must be"),
        (lambda s: {**s, "next_index": 2.0}, "next_index must be"),
        (lambda s: {**s, "seed": 3.0}, "seed=3.0"),
    ],
)
def test_train_set_state_bad_states(state, match):
    if callable(state):
        state = state(_state_at(0))
    with pytest.raises(UserError, match=match):
        _make(_id_source(11)).set_state(state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"global_batch_size": 6, "process_count": 4, "process_index": 0}, r"6.*4"),
        ({"global_batch_size": 0}, "0"),
        ({"global_batch_size": -2}, "-2"),
        ({"global_batch_size": 4, "process_index": 2, "process_count": 2}, "2"),
        ({"global_batch_size": 4, "seed": -1}, "-1"),
        ({"global_batch_size": 4, "seed": 2**32}, "4294967296"),
        ({"global_batch_size": 4, "num_epochs": 0}, "num_epochs"),
        ({"global_batch_size": 8, "process_index": 0, "process_count": 8}, "fewer"),
    ],
)
def test_train_errors(kwargs, match):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(UserError, match=match):
        pipeline.make_train_iterator(_id_source(5), **kwargs)


def test_train_on_digits():
    it = pipeline.make_train_iterator(
        sources.digits_source("train"),
        global_batch_size=64,
        seed=0,
        process_index=1,
        process_count=4,
    )
    batch = next(it)
    assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].max() <= 16
    it.close()


# ---------------------------------------------------------------------------------------------
# Evaluation iterator.


def _eval_union(n, global_batch_size, count):
    src = _id_source(n)
    labels, lengths = [], []
    for index in range(count):
        batches = list(
            pipeline.make_eval_iterator(
                src,
                global_batch_size=global_batch_size,
                process_index=index,
                process_count=count,
            )
        )
        lengths.append(len(batches))
        for b in batches:
            assert b["image"].shape == (global_batch_size // count, 2, 2, 1)
            assert b["mask"].dtype == np.bool_ and b["label"].dtype == np.int32
            assert not b["image"][~b["mask"]].any() and not b["label"][~b["mask"]].any()
            np.testing.assert_array_equal(
                b["image"][b["mask"], 0, 0, 0], b["label"][b["mask"]] % 256
            )
            labels.extend(b["label"][b["mask"]].tolist())
    expected = pipeline.num_eval_batches(
        n, global_batch_size=global_batch_size, process_count=count
    )
    assert lengths == [expected] * count  # lockstep across processes
    return labels


def test_eval_single_process_exact_pass_with_padding():
    src = _id_source(10)
    batches = list(
        pipeline.make_eval_iterator(src, global_batch_size=4, process_index=0, process_count=1)
    )
    assert len(batches) == 3
    assert [b["mask"].tolist() for b in batches][-1] == [True, True, False, False]
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:10], range(10))
    assert all(b["mask"].all() for b in batches[:2])
    # A second call gives a second, identical pass.
    again = list(
        pipeline.make_eval_iterator(src, global_batch_size=4, process_index=0, process_count=1)
    )
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize(
    ("n", "global_batch_size", "count"),
    [(10, 4, 1), (12, 4, 1), (10, 6, 3), (11, 3, 3), (2, 6, 3), (1, 3, 3), (37, 9, 3), (7, 2, 1)],
)
def test_eval_union_over_processes_is_the_split_once(n, global_batch_size, count):
    labels = _eval_union(n, global_batch_size, count)
    assert sorted(labels) == list(range(n))


def test_eval_defaults_and_errors():
    src = _id_source(5)
    assert (
        sum(int(b["mask"].sum()) for b in pipeline.make_eval_iterator(src, global_batch_size=2))
        == 5
    )
    with pytest.raises(ValueError, match=r"global_batch_size=4.*process_count=3"):
        pipeline.make_eval_iterator(src, global_batch_size=4, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="-1"):
        pipeline.make_eval_iterator(src, global_batch_size=-1, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no records"):
        pipeline.make_eval_iterator([], global_batch_size=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index"):
        pipeline.make_eval_iterator(src, global_batch_size=2, process_index=1, process_count=1)


def test_eval_on_folder(tmp_path):
    for i in range(5):
        _write_png(tmp_path / "test" / f"c{i % 2}" / f"{i}.png", _grey(i))
    src = sources.folder_source(tmp_path, "test")
    batches = list(
        pipeline.make_eval_iterator(src, global_batch_size=4, process_index=0, process_count=2)
    )
    assert len(batches) == 2
    assert [b["mask"].tolist() for b in batches] == [[True, True], [True, False]]


@pytest.mark.parametrize("count", [2, 3])
def test_eval_global_batches_do_not_depend_on_the_process_count(count):
    src = _id_source(17)

    def labels_and_masks(process_index, process_count):
        return [
            (b["label"], b["mask"])
            for b in pipeline.make_eval_iterator(
                src, global_batch_size=6, process_index=process_index, process_count=process_count
            )
        ]

    whole = labels_and_masks(0, 1)
    shares = [labels_and_masks(i, count) for i in range(count)]
    assert len(whole) == 3 and all(len(share) == 3 for share in shares)
    for k, (labels, mask) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([s[k][0] for s in shares]), labels)
        np.testing.assert_array_equal(np.concatenate([s[k][1] for s in shares]), mask)


# ---------------------------------------------------------------------------------------------
# Augmentation.


def _random_source(n, side=4):
    """n random square images (no symmetry: the 8 flips and rotations of each differ)."""
    rng = np.random.default_rng(1)
    return sources.array_source(rng.integers(0, 256, (n, side, side, 1), np.uint8), np.arange(n))


def _transform(image, flip, k):
    return np.rot90(image[:, ::-1] if flip else image, k, axes=(0, 1))


def test_augment_flags_match_the_transforms_applied():
    src = _random_source(2048)  # >= 2048 records: grain's index shuffle is cheap
    it = _make(src, global_batch_size=256, augment=True)
    plain = _make(src, global_batch_size=256)
    counts = np.zeros((2, 4), int)  # (flipped, quarter turns)
    for _ in range(8):
        batch, reference = next(it), next(plain)
        assert batch["conditioning"].dtype == np.float32 and batch["conditioning"].shape == (256,)
        np.testing.assert_array_equal(batch["label"], reference["label"])  # the same order
        for image, label, flag in zip(
            batch["image"], batch["label"], batch["conditioning"], strict=True
        ):
            original = src.images[label]
            found = [
                (f, k) for f in (0, 1) for k in range(4)
                if np.array_equal(image, _transform(original, f, k))
            ]  # fmt: skip
            assert len(found) == 1
            ((f, k),) = found
            counts[f, k] += 1
            assert flag == float(f or k > 0)
    # The authors' probabilities: flip 1/2; a rotation 1/2, by 1, 2 or 3 quarter turns.
    total = counts.sum()
    np.testing.assert_allclose(counts.sum(1) / total, [0.5, 0.5], atol=0.03)
    np.testing.assert_allclose(counts.sum(0) / total, [0.5, 1 / 6, 1 / 6, 1 / 6], atol=0.03)


@pytest.mark.parametrize("consumed", [0, 5])
def test_augment_resumes_exactly_on_any_process_count(consumed):
    src, more = _random_source(13), 4
    uninterrupted = _global_batches(src, 1, consumed + more, augment=True)
    assert {"image", "label", "conditioning"} == set(uninterrupted[0])
    writer = _make(src, 2, 1, augment=True)
    _take(writer, consumed)
    state = json.loads(json.dumps(writer.get_state()))
    assert state["augment"] is True
    for count in (1, 2, 4):
        resumed = _global_batches(src, count, more, state=state, augment=True)
        for want, got in zip(uninterrupted[consumed:], resumed, strict=True):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{count} {key}")


def test_augment_needs_square_images():
    with pytest.raises(UserError, match=r"square.*\(2, 3, 1\)"):
        _make(_id_source(5, shape=(2, 3, 1)), augment=True)


def test_eval_with_conditioning_is_unaugmented_with_flag_zero():
    src = _random_source(5)
    batches = list(
        pipeline.make_eval_iterator(
            src, global_batch_size=4, process_index=0, process_count=1, with_conditioning=True
        )
    )
    for b in batches:
        assert b["conditioning"].dtype == np.float32 and not b["conditioning"].any()
    images = np.concatenate([b["image"] for b in batches])[:5]
    np.testing.assert_array_equal(images, src.images)
