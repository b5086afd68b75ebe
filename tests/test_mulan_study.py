"""experiments/mulan_vs_vdm: its configs, its subset of an image folder, and its protocol at a
tiny size (the JSON's fields and the plots)."""

import json
import os

import pytest

from vdm_jax.errors import UserError


def test_configs_share_the_network_and_differ_in_the_model():
    from experiments import common

    for dataset in ("digits", "folder"):
        configs = {
            m: common.load_config("mulan_vs_vdm", f"{dataset},{m},30")
            for m in ("linear", "monotonic", "mulan")
        }
        for name in ("model.n_layer", "model.n_embd", "model.dropout_rate", "model.attention",
                     "training.batch_size", "optimizer.learning_rate", "optimizer.ema_decay",
                     "model.reconstruction_window"):  # fmt: skip
            section, field = name.split(".")
            assert len({c[section][field] for c in configs.values()}) == 1, (dataset, name)
        for c in configs.values():
            assert c.training.num_train_steps == 30 and c.training.eval_every == 10
            assert c.optimizer.decay_steps == 0 and c.training.keep_checkpoints >= 3
        assert configs["linear"].model.schedule == "learned_linear"
        assert configs["monotonic"].model.variance_gradient
        mulan = configs["mulan"].model
        assert mulan.family == "mulan" and mulan.latent_kind == "gaussian"
        assert mulan.parameterization == "v"
    assert configs["mulan"].data.name == "folder"
    with pytest.raises(UserError, match="cifar"):
        common.load_config("mulan_vs_vdm", "cifar,mulan")
    with pytest.raises(UserError, match="topk"):
        common.load_config("mulan_vs_vdm", "digits,topk")


def test_subset_draws_both_splits_with_seed_0(tmp_path):
    from experiments.equal_steps import make_images
    from experiments.mulan_vs_vdm import run
    from vdm_jax.training import sources

    images = tmp_path / "images"
    make_images.main(["--out", str(images), "--train_per_photo", "6", "--test_per_photo", "4"])
    run.write_subset(str(images), str(tmp_path / "a"), num_train=5, num_test=4)
    run.write_subset(str(images), str(tmp_path / "b"), num_train=5, num_test=4)
    for split, count in (("train", 5), ("test", 4)):
        a, b = (sources.folder_source(tmp_path / d, split) for d in "ab")
        assert len(a) == count
        assert [os.path.relpath(f, tmp_path / "a") for f in a.files] == [
            os.path.relpath(f, tmp_path / "b") for f in b.files
        ]
    test_classes = {os.path.basename(os.path.dirname(f)) for f in a.files}
    assert len(test_classes) == 2  # drawn over the split, not its first files
    with pytest.raises(UserError, match="asked for 13"):
        run.write_subset(str(images), str(tmp_path / "c"), num_train=13, num_test=1)


@pytest.mark.slow  # two tiny trainings, bounds, timings, plots: 70 CPU-seconds (2 min loaded)
def test_protocol_writes_every_figure_and_the_plots(tmp_path):
    from experiments.mulan_vs_vdm import run

    out = tmp_path / "results.json"
    argv = ["--smoke", "--datasets", "digits", "--models", "linear,mulan",
            "--workdir", str(tmp_path / "runs"),
            "--num_draws", "2", "--rounds", "1", "--timed_steps", "1", "--plot_images", "2",
            "--json", str(out)]  # fmt: skip
    run.main(argv)
    with open(out) as f:
        digits = json.load(f)["datasets"]["digits"]
    assert set(digits["models"]) == {"linear", "mulan"}
    for name, figures in digits["models"].items():
        assert [e["step"] for e in figures["vlb"]] == [1, 2, 3]
        assert [e["step"] for e in figures["dense_vlb"]] == [1, 2, 3]
        for e in figures["vlb"] + figures["dense_vlb"]:
            assert e["bpd"] > 0 and e["bpd_stderr"] > 0 and e["num_examples"] == 297
        assert ("latent" in figures["dense_vlb"][-1]["terms_bpd"]) == (name == "mulan")
        assert (figures["vlb"][-1]["latent_bpd"] is not None) == (name == "mulan")
        assert digits["speed"][name]["steps_per_sec"] > 0
    counts = {m: f["parameters"] for m, f in digits["models"].items()}
    assert {"encoder", "schedule", "score_net"} <= set(counts["mulan"])
    assert counts["linear"]["score_net"] < counts["mulan"]["score_net"]  # its latent's input
    assert digits["speed"]["linear"]["ratio_to_linear"] == 1.0
    schedule = digits["mulan_schedule"]
    assert len(schedule["gamma_half_std_over_pixels"]) == 2
    assert schedule["all_test_images"]["num_images"] == 297
    for name in schedule["plots"]:
        assert os.path.getsize(tmp_path / "runs" / name) > 1000
