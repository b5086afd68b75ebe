"""The studies of experiments/: every config loads through the command line, and each study's
script runs its smoke settings."""

import contextlib
import glob
import io
import json
import os
import shutil

import numpy as np
import pytest

from vdm_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")

# (study, config argument, fields the study sets) for every config of every study.
CONFIGS = [
    ("objectives", "elbo", {"data.name": "'digits'", "training.num_train_steps": "2000"}),
    ("objectives", "sigmoid", {"objective.weighting": "'sigmoid'", "objective.bias": "2.0"}),
    ("objectives", "sigmoid_v", {"model.parameterization": "'v'"}),
    ("objectives", "sigmoid,300", {"training.num_train_steps": "300"}),
    ("few_step", "", {"data.name": "'digits'", "training.keep_checkpoints": "5"}),
    (
        "schedule_invariance",
        "monotonic",
        {"model.schedule": "'monotonic'", "model.variance_gradient": "True"},
    ),
    ("schedule_invariance", "linear", {"model.schedule": "'learned_linear'"}),
    (
        "equal_steps",
        "",
        {
            "data.name": "'folder'",
            "model.n_layer": "4",
            "model.n_embd": "32",
            "training.batch_size": "32",
            "optimizer.learning_rate": "0.0002",
            "optimizer.warmup_steps": "100",
            "optimizer.decay_steps": "0",
        },
    ),
    ("equal_steps", "2,smoke", {"model.n_layer": "1", "training.num_train_steps": "2"}),
    (
        "paper_cifar10",
        "",
        {
            "data.name": "'cifar10'",
            "model.n_layer": "32",
            "model.n_embd": "128",
            "training.batch_size": "128",
        },
    ),
    ("paper_cifar10", "aug", {"data.augment": "True", "model.n_embd": "256"}),
    (
        "likelihood_estimators",
        "digits",
        {"data.name": "'digits'", "training.num_train_steps": "5000"},
    ),
    ("likelihood_estimators", "digits,smoke", {"training.num_train_steps": "4"}),
    ("likelihood_estimators", "authors", {"data.name": "'folder'", "eval.batch_size": "16"}),
    ("mulan_vs_vdm", "digits,mulan", {"model.family": "'mulan'", "model.n_embd": "32"}),
    ("mulan_vs_vdm", "folder,monotonic", {"data.name": "'folder'", "model.n_layer": "2"}),
]


def _show_config(value: str) -> str:
    """What ``python -m vdm_jax --config=VALUE --mode=show_config`` prints, in this process."""
    from vdm_jax import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(cli.parse_flags(["vdm_jax", f"--config={value}", "--mode=show_config"]))
    return out.getvalue()


@pytest.mark.parametrize(("study", "arg", "fields"), CONFIGS, ids=lambda x: str(x)[:20])
def test_every_study_config_loads_through_the_command_line(study, arg, fields):
    path = os.path.join(EXPERIMENTS, study, "config.py")
    shown = {
        line.split(" = ")[0]: line.split(" = ")[1].split("  ")[0]
        for line in _show_config(path + (f":{arg}" if arg else "")).splitlines()
        if " = " in line and not line.startswith("#")
    }
    for name, value in fields.items():
        assert shown[name] == value, (name, shown[name])


def test_every_study_has_a_config_a_readme_and_a_line_in_the_index():
    studies = sorted(
        os.path.basename(os.path.dirname(p))
        for p in glob.glob(os.path.join(EXPERIMENTS, "*", "config.py"))
    )
    assert studies == sorted({study for study, _, _ in CONFIGS})
    with open(os.path.join(EXPERIMENTS, "README.md")) as f:
        index = f.read()
    for study in studies:
        assert os.path.isfile(os.path.join(EXPERIMENTS, study, "README.md")), study
        assert f"]({study}/)" in index, study


@pytest.mark.parametrize(
    ("study", "arg"),
    [
        ("objectives", "nope"),
        ("schedule_invariance", "cosine"),
        ("paper_cifar10", "smoke"),
        ("likelihood_estimators", "authors,smoke"),
        ("equal_steps", "tiny"),
        ("mulan_vs_vdm", "digits,cosine"),
    ],
)
def test_an_unknown_variant_is_a_user_error_naming_it(study, arg):
    from experiments import common

    with pytest.raises(UserError, match=arg):
        common.load_config(study, arg)


@pytest.mark.slow  # compiles every sampler and the ODE solve: minutes on a loaded CPU
def test_few_step_smoke_prints_every_sampler_and_writes_the_plot(tmp_path, capsys):
    from PIL import Image

    from experiments.few_step import run as few_step

    png, out = tmp_path / "few_step.png", tmp_path / "few_step.json"
    few_step.main(["--smoke", "--plot", str(png), "--json", str(out)])
    stdout = capsys.readouterr().out
    rows = [line.split("|") for line in stdout.splitlines() if "| NFE" in line]
    printed = {(r[1].strip(), int(r[2].split()[1])): r[-1] for r in rows}
    samplers = ("ancestral", "ddim", "dpm_solver", "dpm_solver_sde")
    assert sorted(printed) == sorted((s, n) for s in samplers for n in (2, 4)), stdout
    for (sampler, _), text in printed.items():
        stochastic = sampler in ("ancestral", "dpm_solver_sde")
        assert ("stochastic: not expected to vanish" in text) == stochastic, text
    (model,) = json.loads(out.read_text())["models"]
    rms = {(r["sampler"], r["nfe"]): r["rms"] for r in model["rows"]}
    assert all(0 < value < 10 for value in rms.values()), rms
    for row in model["rows"]:
        assert 0 <= row["decoded_differ"] <= 1 and row["rms_agreeing"] >= 0, row
    # The deterministic solvers approach the flow solution as the evaluations double.
    for sampler in ("ddim", "dpm_solver"):
        assert rms[(sampler, 4)] < rms[(sampler, 2)], rms
    assert "DPM-Solver++(2M) within 0.01" in stdout
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200


def test_equal_steps_images_and_the_protocols_subset(tmp_path):
    from experiments.equal_steps import make_images, run
    from vdm_jax.training import sources

    images, subset = tmp_path / "images", tmp_path / "subset"
    make_images.main(["--out", str(images), "--train_per_photo", "6", "--test_per_photo", "3"])
    train = sources.folder_source(images, "train")
    assert len(train) == 12 and train.info.image_shape == (32, 32, 3)
    assert len(sources.folder_source(images, "test")) == 6
    run.write_subset(str(images), str(subset), num_train=5, num_test=4)
    drawn, first = sources.folder_source(subset, "train"), sources.folder_source(subset, "test")
    assert len(drawn) == 5 and len(first) == 4
    names = [os.path.relpath(f, subset / "test") for f in first.files]
    everything = [
        os.path.relpath(f, images / "test") for f in sources.folder_source(images, "test").files
    ]
    assert names == everything[:4]
    # The same draw again: seed 0, whatever the run.
    again = tmp_path / "again"
    run.write_subset(str(images), str(again), num_train=5, num_test=4)
    assert [os.path.relpath(f, again) for f in sources.folder_source(again, "train").files] == [
        os.path.relpath(f, subset) for f in drawn.files
    ]
    with pytest.raises(UserError, match="needs at least 13"):
        run.write_subset(str(images), str(tmp_path / "more"), num_train=13, num_test=1)


@pytest.mark.slow
def test_equal_steps_trains_our_side_and_reports_its_bound(tmp_path):
    from experiments.equal_steps import make_images, run

    images, subset = tmp_path / "images", tmp_path / "subset"
    make_images.main(["--out", str(images), "--train_per_photo", "16", "--test_per_photo", "4"])
    run.write_subset(str(images), str(subset), num_train=32, num_test=8)
    sides = ["ours"] + (["original"] if os.environ.get("VDM_ORIGINAL") else [])
    out = tmp_path / "equal.json"
    result = run.main(
        [
            "--data",
            str(subset),
            "--workdir",
            str(tmp_path / "runs"),
            "--steps",
            "2",
            "--smoke",
            "--sides",
            ",".join(sides),
            "--json",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == result
    for side in sides:
        figures = result["sides"][side]
        assert figures["num_test"] == 8
        assert 0 < figures["test_bpd"] < 20 and figures["test_bpd_stderr"] > 0, figures


@pytest.mark.slow
def test_objectives_smoke_reports_a_variant(tmp_path):
    # One variant, a weighted objective: the study's loop is the same for each, and the
    # ELBO's training is the trainer's default, tested throughout.
    from experiments.objectives import run as objectives

    result = objectives.main(
        ["--smoke", "--workdir", str(tmp_path / "runs"), "--variants", "sigmoid"]
    )
    assert result["steps"] == 2 and result["test_split_frechet"] > 0
    assert list(result["variants"]) == ["sigmoid"]
    figures = result["variants"]["sigmoid"]
    assert figures["test_bpd"] > 0 and figures["test_bpd_stderr"] > 0, figures
    assert figures["frechet"] > 0, figures


@pytest.mark.slow
def test_schedule_invariance_smoke_measures_both_schedules(tmp_path):
    from experiments.schedule_invariance import run as schedules

    result = schedules.main(
        ["--smoke", "--workdir", str(tmp_path / "runs"), "--kinds", "monotonic"]
    )
    figures = result["kinds"]["monotonic"]
    assert figures["step"] == 2 and figures["bins"] == 4
    for name in ("own", "linear"):
        assert figures[f"{name}_expected"] > 0 and figures[f"{name}_estimator_std"] > 0
    assert os.path.isfile(tmp_path / "runs" / "monotonic" / "loss_by_time.png")


@pytest.mark.slow
def test_likelihood_estimators_smoke_measures_every_estimator(tmp_path, digits_smoke_run):
    from experiments.likelihood_estimators import run as estimators

    # The study's smoke model is the digits smoke run: the session's, not trained again.
    shutil.copytree(digits_smoke_run[0], tmp_path / "runs" / "digits")
    out = tmp_path / "estimators.json"
    result = estimators.main(
        ["--smoke", "--workdir", str(tmp_path / "runs"), "--models", "digits", "--json", str(out)]
    )
    assert json.loads(out.read_text())["models"].keys() == {"digits"}
    figures = result["models"]["digits"]
    assert figures["num_examples"] == 2
    rows = {(r["estimator"], r["K"]): r for r in figures["rows"]}
    assert set(rows) == {("vlb", 1), ("dense_vlb", 2), ("discrete", 2), ("ode", 2), ("ode_iw", 2)}
    for (name, k), r in rows.items():
        assert np.isfinite(r["bpd"]) and r["bpd_stderr"] > 0 and r["seconds_per_image"] > 0, r
        cheap = name in ("vlb", "dense_vlb", "discrete")  # K network evaluations
        assert r["nfe_per_image"] == k if cheap else r["nfe_per_image"] > 2 * k, r
    # One ODE pass gives both: the same draws, their mean and their importance-weighted mean.
    assert rows["ode", 2]["spread_bpd"] == rows["ode_iw", 2]["spread_bpd"]
    assert rows["ode_iw", 2]["bpd"] <= rows["ode", 2]["bpd"] + 1e-6
    assert rows["ode_iw", 2]["cpu_seconds_per_image"] > 0
    # `ode` and `ode_iw` from the first K' draws of that pass, at K'/K of its cost.
    derived = {(r["estimator"], r["K"]): r for r in figures["first_draws"]}
    assert set(derived) == {("ode", 1), ("ode_iw", 1), ("ode", 2), ("ode_iw", 2)}
    assert derived["ode", 1]["bpd"] == pytest.approx(derived["ode_iw", 1]["bpd"])
    for name in ("ode", "ode_iw"):
        assert derived[name, 2]["bpd"] == pytest.approx(rows[name, 2]["bpd"])
        whole, half = rows[name, 2]["nfe_per_image"], derived[name, 1]["nfe_per_image"]
        assert half == pytest.approx(whole / 2), (half, whole)
