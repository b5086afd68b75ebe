"""Checkpoints of the original VDM code: agreement with what that code computes, bad input.

The fixtures (``tests/fixtures/authors_vdm``, see ``tests/fixtures/README.md``) are two small
checkpoints written by the original code, with its outputs from their EMA weights, made by
``tests/fixtures/make_authors_vdm.py``.
"""

import json
import os
import shutil
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from vdm_jax import pretrained
from vdm_jax.configs import cifar10, digits
from vdm_jax.errors import UserError
from vdm_jax.maths.schedules import UnnormalisedMonotonicSchedule
from vdm_jax.models import evaluation
from vdm_jax.models.unet import ScoreUNet
from vdm_jax.models.vdm import VDM
from vdm_jax.training import importer, pipeline, steps

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "authors_vdm"
#: The larger checkpoints of the same code kept beside the checkout, when there are some.
SHARED = REPO.parent / "shared" / "fixtures" / "authors_vdm"
NAMES = ["scalar", "nnet_aug"]
KINDS = {"learnable_scalar": "learned_linear", "learnable_nnet": "monotonic_unnormalised"}


def _fixture(name: str) -> Path:
    root = FIXTURES / name
    assert (root / "expected.npz").exists(), f"{root}: remake it, see tests/fixtures/README.md"
    return root


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    """(root, expected outputs, model, EMA variables) of one fixture."""
    root = _fixture(request.param)
    model, variables = pretrained.load_original_checkpoint(root / "checkpoints-0", params="ema")
    return root, dict(np.load(root / "expected.npz")), model, variables


def test_architecture_is_read_from_the_tree(loaded):
    root, _, model, _ = loaded
    made = json.loads((root / "made_with.json").read_text())
    arch = pretrained.read_original_checkpoint(root).architecture  # the parent folder works too
    assert (arch.n_layer, arch.n_embd, arch.image_channels) == (made["n_layer"], made["n_embd"], 3)
    assert arch.attention_everywhere == bool(made["with_attention"])
    assert arch.with_fourier_features and arch.conditioning_input
    assert arch.schedule == KINDS[made["gamma_type"]]
    net = model.score_net
    assert (net.norm_groups, net.norm_min_group_size, net.fourier_exponents) == (32, 1, (6, 7))


@pytest.mark.slow
def test_gamma_and_eps_hat_equal_the_original_code(loaded):
    _, expected, model, variables = loaded
    _assert_gamma_and_eps_hat(expected, model, variables)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_shared_checkpoints_still_import(name):
    """The checkpoints beside the checkout (trained on CIFAR-10 images), when present."""
    root = SHARED / name
    if not (root / "expected.npz").exists():
        pytest.skip(f"no checkpoints of the original code at {root}")
    model, variables = pretrained.load_original_checkpoint(root / "checkpoints-0", params="ema")
    _assert_gamma_and_eps_hat(dict(np.load(root / "expected.npz")), model, variables)


def _assert_gamma_and_eps_hat(expected, model, variables):
    gamma = model.apply(variables, jnp.asarray(expected["t"]), method=model.gamma)
    np.testing.assert_allclose(gamma, expected["gamma_t"], rtol=0, atol=1e-5)

    predict = jax.jit(
        lambda v, z, g, c: model.apply(v, z, g, conditioning=c, method=model.predict_noise)
    )
    eps_hat = predict(
        variables, expected["z"], expected["gamma"], jnp.asarray(expected["conditioning"])
    )
    scale = np.abs(expected["eps_hat"]).max()
    np.testing.assert_allclose(eps_hat, expected["eps_hat"], rtol=0, atol=1e-4 * scale)


def _their_gamma(tree, t):
    """The original code's schedules, evaluated in numpy from its parameter tree."""
    if set(tree) == {"w", "b"}:
        return float(tree["b"][0]) + abs(float(tree["w"][0])) * t
    g = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in tree.items()}
    column = t[:, None]
    hidden = column @ np.abs(g["l2"]["kernel"]) + g["l2"]["bias"]
    hidden = 2.0 * (1.0 / (1.0 + np.exp(-hidden)) - 0.5)
    linear = column @ np.abs(g["l1"]["kernel"]) + g["l1"]["bias"]
    return (linear + hidden @ np.abs(g["l3"]["kernel"]) / hidden.shape[1])[:, 0]


@pytest.mark.parametrize("name", NAMES)
def test_raw_params_are_read_too(name):
    root = _fixture(name)
    raw = flax.serialization.msgpack_restore((root / "checkpoints-0" / "ckpt-1.flax").read_bytes())
    model, variables = pretrained.load_original_checkpoint(root, params="params")
    t = np.linspace(0.0, 1.0, 11, dtype=np.float32)
    gamma = jax.jit(lambda v, t: model.apply(v, t, method=model.gamma))(variables, t)
    np.testing.assert_allclose(gamma, _their_gamma(raw["params"]["gamma"], t), rtol=0, atol=1e-5)
    ours, theirs = variables["params"]["score_net"], raw["params"]["score_model"]
    for our_key, their_key in [
        (("cond_dense_0", "kernel"), ("dense0", "kernel")),
        (("norm_out", "scale"), ("GroupNorm_0", "scale")),
        (("up_block_1", "norm2", "bias"), ("up.block_1", "GroupNorm_1", "bias")),
        (("up_block_0", "skip_proj", "kernel"), ("up.block_0", "nin_shortcut", "kernel")),
        (("mid_attn", "query", "kernel"), ("mid.attn_1", "q", "kernel")),
    ]:
        np.testing.assert_array_equal(
            _get(ours, our_key), _get(theirs, their_key), err_msg=str(our_key)
        )
    count = sum(np.size(a) for a in jax.tree.leaves(variables))
    assert count == sum(np.size(a) for a in jax.tree.leaves(raw["params"]))
    ema = pretrained.load_original_checkpoint(root, params="ema")[1]
    assert not np.array_equal(
        _get(ours, ("conv_out", "kernel")), ema["params"]["score_net"]["conv_out"]["kernel"]
    )


def _get(tree, keys):
    for key in keys:
        tree = tree[key]
    return np.asarray(tree)


@pytest.mark.slow
def test_vlb_terms_agree_per_image(loaded, optimized):
    """Our bound's three terms per image, averaged over draws of (t, noise), against theirs.

    The reconstruction and diffusion terms are random: each image's mean must lie within 4
    standard errors (of the difference of the two means) of theirs. The prior term does not
    depend on the draw; their float32 evaluation of var_1 - log(var_1) - 1 (about 2e-5 per
    dimension, formed from numbers near 1) loses about 1e-5 of it, so it is compared with a
    relative tolerance of 1e-4. Compiled with XLA's optimisations: its 32 passes of the
    network run for longer than they compile.
    """
    _, expected, model, variables = loaded
    # The same function, organised for a CPU's caches (about twice as fast with attention).
    model = model.clone(score_net=model.score_net.clone(attention="chunked"))
    repeats = 32
    images = jnp.asarray(expected["images"])
    conditioning = jnp.asarray(expected["images_conditioning"])

    @jax.jit
    def draws(keys):
        def one(key):
            terms = model.apply(
                variables, images, conditioning=conditioning, train=False, rngs={"diffusion": key}
            )
            return jnp.stack([terms.prior, terms.reconstruction, terms.diffusion])

        return jax.lax.map(one, keys)

    ours = np.asarray(draws(jax.random.split(jax.random.key(0), repeats)), np.float64)  # [R, 3, 16]
    mean, std = ours.mean(0), ours.std(0, ddof=1)
    their_mean = expected["vlb_terms_mean"].astype(np.float64)
    their_se2 = expected["vlb_terms_std"].astype(np.float64) ** 2 / int(expected["repeats"])
    np.testing.assert_allclose(mean[0], their_mean[0], rtol=1e-4)
    z = (mean[1:] - their_mean[1:]) / np.sqrt(their_se2[1:] + std[1:] ** 2 / repeats)
    assert np.all(np.abs(z) < 4.0), f"z-scores (reconstruction, diffusion) per image: {z}"


def test_unnormalised_schedule_pieces_compose():
    schedule = UnnormalisedMonotonicSchedule(n_features=16)
    t = jnp.linspace(0.0, 1.0, 9)

    @jax.jit
    def pieces(key):
        params = schedule.init(key, t)
        start, span = schedule.apply(params, method=schedule.start_and_span)
        ends = jnp.stack(schedule.apply(params, method=schedule.endpoints))
        shape = schedule.apply(params, t, method=schedule.shape)
        return schedule.apply(params, t), ends, start + span * shape

    gamma, ends, composed = pieces(jax.random.key(0))
    np.testing.assert_allclose(ends, gamma[jnp.array([0, -1])], atol=1e-5)
    np.testing.assert_allclose(composed, gamma, atol=1e-5)
    assert np.all(np.diff(np.asarray(gamma)) > 0)
    # Initialised as in the original code: l1 alone is the linear schedule from -13.3 to 5.
    np.testing.assert_allclose(ends, [-13.3, 5.0], atol=0.1)


# Bad input: each case one UserError naming the path.


def _write_state(folder: Path, state) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ckpt-5.flax").write_bytes(flax.serialization.msgpack_serialize(state))
    (folder / "checkpoint").write_text('model_checkpoint_path: "ckpt-5"\n')
    return folder


def _state():
    root = _fixture("scalar")
    return flax.serialization.msgpack_restore((root / "checkpoints-0" / "ckpt-1.flax").read_bytes())


def test_no_checkpoint_in_the_folder(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}: no original VDM checkpoint"):
        pretrained.load_original_checkpoint(tmp_path)
    with pytest.raises(UserError, match="no such file or folder"):
        pretrained.load_original_checkpoint(tmp_path / "missing")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-9"\n')
    with pytest.raises(UserError, match=r"names 'ckpt-9' but .*ckpt-9\.flax does not exist"):
        pretrained.load_original_checkpoint(tmp_path)


@pytest.mark.parametrize("content", ["truncated", "text"])
def test_truncated_or_not_msgpack(tmp_path, content):
    source = _fixture("scalar") / "checkpoints-0"
    shutil.copytree(source, tmp_path / "ck")
    file = tmp_path / "ck" / "ckpt-1.flax"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 3] if content == "truncated" else b"not a checkpoint")
    with pytest.raises(UserError, match=f"{file}: not a readable msgpack train state"):
        pretrained.load_original_checkpoint(tmp_path / "ck")


def test_trees_that_match_no_layout(tmp_path):
    state = _state()
    del state["ema_params"]["score_model"]["mid.block_2"]["conv1"]
    folder = _write_state(tmp_path / "missing", state)
    with pytest.raises(
        UserError,
        match=r"ckpt-5\.flax: ema_params .*missing key score_model/mid\.block_2/conv1/bias",
    ):
        pretrained.load_original_checkpoint(folder)

    state = _state()
    state["ema_params"]["score_model"]["down.block_0"]["extra"] = {"kernel": np.zeros(3)}
    folder = _write_state(tmp_path / "unexpected", state)
    with pytest.raises(UserError, match=r"unexpected key score_model/down\.block_0/extra/kernel"):
        pretrained.load_original_checkpoint(folder)

    state = _state()
    state["ema_params"]["score_model"]["up.block_1"]["conv2"]["kernel"] = np.zeros((3, 3, 32, 8))
    folder = _write_state(tmp_path / "shape", state)
    with pytest.raises(UserError, match=r"up.block_1/conv2/kernel has shape \(3, 3, 32, 8\)"):
        pretrained.load_original_checkpoint(folder)

    state = _state()
    state["ema_params"]["gamma"] = {"scale": np.ones(1)}
    folder = _write_state(tmp_path / "schedule", state)
    with pytest.raises(UserError, match=r"gamma/\['scale'\] match none"):
        pretrained.load_original_checkpoint(folder)

    folder = _write_state(tmp_path / "not_a_state", {"weights": np.zeros(2)})
    with pytest.raises(UserError, match="not a VDM train state: no 'params' entry"):
        pretrained.load_original_checkpoint(folder)
    with pytest.raises(UserError, match="params must be 'ema' or 'params', got 'raw'"):
        pretrained.load_original_checkpoint(folder, params="raw")


# The command line: import into a new workdir, then eval, sample and train on it.


def _image_folder(root: Path, images: np.ndarray) -> Path:
    """The fixture's images as both splits of an image folder (one class)."""
    for split in ("train", "test"):
        (root / split / "0").mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / split / "0" / f"{i:02d}.png")
    return root


#: Our config for each fixture, as the authors' config for each released checkpoint.
CONFIGS = {"scalar": "cifar10.py", "nnet_aug": "cifar10_aug.py"}


def _command_line_config(name: str, images: Path, work: Path) -> list[str]:
    """The command line's flags: our config for the fixture ``name`` on the image folder
    ``images``, the run in ``work``."""
    return [
        f"--config=vdm_jax/configs/{CONFIGS[name]}:smoke",
        "--config.data.name=folder",
        f"--config.data.data_dir={images}",
        "--config.eval.batch_size=16",
        "--config.eval.discrete_timesteps=0",
        "--config.sampling.num_samples=4",
        "--config.sampling.sampling_steps=2",
        "--config.model.attention=chunked",  # the same function, faster on CPUs
        # As the processes have: in this process too, not its 8 fake devices.
        "--config.parallel.num_devices=1",
        f"--workdir={work}",
    ]


def _check_imported_run(name: str, root: Path, work: Path, stdout: str) -> None:
    """What --mode=import printed and wrote for the fixture ``name``."""
    # Each model field the checkpoint changes, by name (the smoke config has 16 channels).
    assert "model.n_embd: 32 from the checkpoint (the config has 16)" in stdout
    saved = json.loads((work / "config.json").read_text())
    made = json.loads((root / "made_with.json").read_text())
    model = saved["model"]
    assert (model["n_embd"], model["norm_min_group_size"], model["conditioning_input"]) == (
        32, 1, True,
    )  # fmt: skip
    assert model["schedule"] == KINDS[made["gamma_type"]]
    assert model["attention_everywhere"] == bool(made["with_attention"])
    assert saved["data"]["augment"] == (name == "nnet_aug")
    assert json.loads((work / "imported.json").read_text())["step"] == 20


@pytest.mark.slow
def test_command_line_import_eval_sample_and_train(tmp_path, cli):
    """As a user runs it: import and train on as processes (the machine's own device); between
    them eval given the same --config and sample given only --workdir (the run's own config),
    the command line's main in this process."""
    root = _fixture("scalar")
    expected = np.load(root / "expected.npz")
    images = _image_folder(tmp_path / "images", expected["images"])
    work = tmp_path / "run"
    config = _command_line_config("scalar", images, work)
    imported = cli.run("--mode=import", f"--import_from={root / 'checkpoints-0'}", *config)
    assert imported.returncode == 0, imported.stderr[-3000:]
    _check_imported_run("scalar", root, work, imported.stdout)

    cli.in_process("--mode=eval", *config)
    record = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 20 and record["test/num_examples"] == 16
    # Their flag is 0 for every image, as in our evaluation. One draw per image here, their 64
    # per image: the same bound within 4 standard errors.
    to_bpd = 1 / (3072 * np.log(2))
    theirs = expected["vlb_terms_mean"].sum(0).mean() * to_bpd
    their_se = np.sqrt(np.sum(expected["vlb_terms_std"] ** 2, 0) / 64).mean() * to_bpd
    gap = abs(record["test/bpd"] - theirs)
    assert gap < 4 * np.hypot(record["test/bpd_stderr"], their_se), (record, theirs)

    cli.in_process("--mode=sample", f"--workdir={work}")
    assert len(os.listdir(work / "samples")) == 1

    trained = cli.run(*config, "--config.training.num_train_steps=22")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "resumed from step 20" in trained.stderr
    records = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert max(r["step"] for r in records) == 22 and "test/bpd" in records[-1]


@pytest.mark.slow
def test_command_line_import_in_process_then_refusals(tmp_path, cli, capsys):
    """nnet_aug imported by the command line's main in this process (the command line as a
    process, then eval, sample and training on an imported run: the test above); a workdir
    holding a run is refused, a flag that disagrees with the run is an error: one ``error:``
    line, exit status 1 (any other exception fails the test)."""
    root = _fixture("nnet_aug")
    images = _image_folder(tmp_path / "images", np.load(root / "expected.npz")["images"])
    work = tmp_path / "run"
    config = _command_line_config("nnet_aug", images, work)
    cli.in_process("--mode=import", f"--import_from={root / 'checkpoints-0'}", *config)
    _check_imported_run("nnet_aug", root, work, capsys.readouterr().out)

    for refused, message in [
        (("--mode=import", f"--import_from={root}"), f"workdir {work} already holds a run"),
        (("--config.model.n_embd=64",), "--config.model.n_embd=64 disagrees with the trained run"),
    ]:
        with pytest.raises(SystemExit) as exited:
            cli.in_process(*config, *refused)
        assert exited.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err[-2000:]


def test_import_refuses_bad_input(tmp_path):
    """Each mistake is one UserError naming the field, the data or the folder; nothing is
    written."""
    root = _fixture("scalar")
    smoke = cifar10.get_config("smoke")
    with pytest.raises(UserError, match=r"models 3-channel images, but the config's data "
                       r"\(digits\) has 1 channels"):  # fmt: skip
        importer.import_original(digits.get_config("smoke"), tmp_path / "a", root)
    with pytest.raises(UserError, match=r"--config\.model\.n_embd=16 disagrees with the "
                       r"checkpoint .*ckpt-1\.flax, which has model\.n_embd=32"):  # fmt: skip
        importer.import_original(smoke, tmp_path / "b", root, {"model.n_embd": 16})
    held = tmp_path / "c"
    held.mkdir()
    (held / "config.json").write_text(smoke.to_json())
    with pytest.raises(UserError, match=f"workdir {held} already holds a run"):
        importer.import_original(smoke, held, root)
    assert sorted(os.listdir(tmp_path)) == ["c"] and os.listdir(held) == ["config.json"]
    assert not importer.is_imported(held)


def _conditioned_model(init_state):
    """A small VDM whose network takes the conditioning input, a train state with its
    parameters moved away from the initialisation (whose zero output layers ignore the
    conditioning), and 4 images."""
    net = ScoreUNet(n_layer=1, n_embd=8, dropout_rate=0.0, conditioning_input=True)
    model = VDM(score_net=net, vocab_size=17)
    optimizer = optax.adam(1e-3)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 17, (4, 8, 8, 1)), jnp.uint8)
    state = init_state(model, optimizer, jax.random.key(0), images[:1])
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    moved = [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return model, optimizer, state.replace(params=jax.tree.unflatten(tree, moved)), images


@pytest.mark.slow
def test_train_step_feeds_the_batch_conditioning_to_the_network(init_state):
    """The batch's float "conditioning" reaches a network with a conditioning input, through
    the sharded path too."""
    model, optimizer, state, images = _conditioned_model(init_state)
    step = jax.jit(
        lambda batch: steps.train_step(
            state, batch, jax.random.key(1), model=model, optimizer=optimizer, ema_decay=0.9,
            num_shards=2,
        )[1]["diffusion_bpd"]
    )  # fmt: skip
    zeros = step({"image": images, "conditioning": jnp.zeros((4,), jnp.float32)})
    ones = step({"image": images, "conditioning": jnp.ones((4,), jnp.float32)})
    assert np.isfinite(zeros) and ones != zeros


@pytest.mark.slow
def test_bound_terms_feed_the_batch_conditioning_to_the_network(init_state):
    """The evaluation bound (and the training system's eval step, which is it) passes the
    batch's flag to the network; no flag is flag 0."""
    model, _, state, images = _conditioned_model(init_state)
    key = jax.random.key(1)
    bound = jax.jit(
        lambda batch: evaluation.bound_terms(model, {"params": state.params}, batch, key)
    )
    absent = bound({"image": images}).diffusion
    zeros = bound({"image": images, "conditioning": jnp.zeros(4)}).diffusion
    ones = bound({"image": images, "conditioning": jnp.ones(4)}).diffusion
    np.testing.assert_array_equal(absent, zeros)
    assert np.all(ones != zeros), (ones, zeros)


def test_the_training_loop_keeps_the_batch_conditioning():
    """The loop drops the labels of an unconditional model, not the augmentation flag."""
    batch = {"image": np.zeros((2, 4, 4, 3)), "label": np.zeros(2), "conditioning": np.ones(2)}
    fed = pipeline.dispatch_batch([batch], use_labels=False)
    assert sorted(fed) == ["conditioning", "image"]
    assert sorted(pipeline.dispatch_batch([batch], use_labels=True)) == sorted(batch)
    stacked = pipeline.dispatch_batch([batch, batch], use_labels=False)
    assert stacked["conditioning"].shape == (2, 2)
