"""The run report: plots from metrics and a checkpoint, one self-contained HTML page."""

import base64
import html.parser
import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from vdm_jax import VDM, FixedLinearSchedule, ScoreUNet
from vdm_jax.configs import digits
from vdm_jax.errors import UserError
from vdm_jax.training import report_data, report_render, trainer


def _assert_not_blank(png_bytes: bytes) -> None:
    image = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("L"), np.float64)
    assert image.shape[0] > 50 and image.shape[1] > 50
    # A plot has axes, lines and text: many grey levels and a real spread, not one colour.
    assert image.std() > 5 and len(np.unique(image)) > 20


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.tags = [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.sources += [v for k, v in attrs if k in ("src", "href")]


def _assert_only_embedded_images(page: str, count: int) -> None:
    parser = _Images()
    parser.feed(page)
    assert len(parser.sources) == count and not parser.tags & {"script", "link", "iframe"}
    for source in parser.sources:
        head, data = source.split(",", 1)
        assert head == "data:image/png;base64"
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    assert "http://" not in page and "https://" not in page


@pytest.mark.slow
def test_plots_and_page_from_plain_records(tmp_path):
    records = []
    for step in range(50, 1050, 50):
        decay = 1000.0 / (step + 200)
        records.append({
            "step": step, "bpd": 2.0 + decay, "prior_bpd": 1e-3, "reconstruction_bpd": 0.02,
            "diffusion_bpd": 2.0 + decay - 0.021, "gamma_0": -8.0 + step / 2000,
            "gamma_1": 6.0, "grad_norm": 5.0 * decay, "lr": 1e-3,
        })  # fmt: skip
    records.append({"step": 1000, "test/bpd": 2.9, "test/prior_bpd": 1e-3,
                    "test/reconstruction_bpd": 0.03, "test/diffusion_bpd": 2.87})  # fmt: skip
    t = np.linspace(0.0, 1.0, 101)
    figures = [
        ("schedule", report_render.plot_schedule(t, -7 + 12 * t**1.5, tmp_path / "s.png",
                                          initial=-8 + 14 * t)),
        ("training", report_render.plot_training(records, tmp_path / "t.png")),
        ("per t", report_render.plot_loss_by_time(
            report_data.LossByTime(t=t, mean=np.exp(-5 * t), variance=np.exp(-8 * t), num_images=9),
            tmp_path / "l.png",
            linear=report_data.LossByTime(t=t, mean=np.exp(-4 * t), variance=np.exp(-6 * t),
                                     num_images=9))),
    ]  # fmt: skip
    for _, png in figures:
        _assert_not_blank(open(png, "rb").read())
    page = report_render.write_html(
        tmp_path / "index.html", title="a <run>", summary={"test bound": "2.9 bits/dim"},
        figures=figures, samples=[("grid", figures[0][1])], config_text='{"seed": 0}',
    )  # fmt: skip
    text = open(page).read()
    _assert_only_embedded_images(text, 4)
    assert "a &lt;run&gt;" in text and "2.9 bits/dim" in text and "&quot;seed&quot;" in text


@pytest.mark.slow
def test_report_on_a_digits_smoke_run(digits_smoke_copy):
    tmp_path, config = digits_smoke_copy, digits.get_config("smoke")
    page = trainer.report(config, str(tmp_path), num_bins=3, num_images=20)

    assert page == str(tmp_path / "report" / "index.html")
    names = ("schedule.png", "training.png", "loss_by_time.png")
    for name in names:
        _assert_not_blank((tmp_path / "report" / name).read_bytes())
    text = (tmp_path / "report" / "index.html").read_text()
    # The three plots and the one sample grid, all embedded; nothing loaded from elsewhere.
    _assert_only_embedded_images(text, 4)
    assert "test bound (step 4)" in text and "&quot;digits&quot;" in text  # figures, config
    # The schedule plot and the sample grid also went to TensorBoard.
    events = b"".join(
        (tmp_path / "tensorboard" / f).read_bytes() for f in os.listdir(tmp_path / "tensorboard")
    )
    assert b"report/schedule" in events and b"report/samples" in events


def test_report_errors_name_the_workdir_and_the_remedy(tmp_path, cli, capsys):
    config = digits.get_config("smoke")
    with pytest.raises(ValueError, match="does not exist: train first"):
        trainer.report(config, str(tmp_path / "missing"))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "bpd": 3.0}) + "\n")
    with pytest.raises(ValueError, match=r"no checkpoint in .*train first"):
        trainer.report(config, str(tmp_path))
    # The command line prints it as one line (its exit code and the absence of a traceback
    # as a process: test_reliability.py).
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.in_process("--config=digits:smoke", f"--workdir={tmp_path / 'missing'}",
                       "--mode=report")  # fmt: skip
    assert exited.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: workdir") and "does not exist" in line


def test_read_metrics_skips_a_partial_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "bpd": 2.5}\n{"step": 2, "bpd": 2.4}\n{"step": 3, "bp')
    assert report_data.read_metrics(path) == [{"step": 1, "bpd": 2.5}, {"step": 2, "bpd": 2.4}]
    path.write_text('{"step": 1, "bp\n{"step": 2, "bpd": 2.4}\n')
    with pytest.raises(UserError, match="line 1"):
        report_data.read_metrics(path)
    with pytest.raises(UserError, match="no metrics file"):
        report_data.read_metrics(tmp_path / "none.jsonl")
    with pytest.raises(UserError, match="no training record"):
        report_render.plot_training([{"step": 4, "test/bpd": 2.0}], tmp_path / "t.png")


@pytest.mark.slow
def test_loss_by_time_does_not_depend_on_batching_and_matches_linear_for_a_linear_schedule():
    model = VDM(
        score_net=ScoreUNet(n_layer=1, n_embd=8, norm_groups=4, with_fourier_features=False),
        schedule=FixedLinearSchedule(-6.0, 4.0),
        vocab_size=5,
    )
    images = np.asarray(jax.random.randint(jax.random.key(0), (7, 4, 4, 1), 0, 5), np.uint8)
    variables = model.init(
        {"params": jax.random.key(1), "diffusion": jax.random.key(2)}, images, train=False
    )
    key = jax.random.key(3)
    whole = report_data.diffusion_loss_by_time(model, variables, images, key, num_bins=2)
    padded = report_data.diffusion_loss_by_time(
        model, variables, images, key, num_bins=2, batch_size=3
    )
    linear = report_data.diffusion_loss_by_time(
        model, variables, images, key, num_bins=2, batch_size=3, linear=True
    )
    np.testing.assert_allclose(padded.mean, whole.mean, rtol=1e-5)
    np.testing.assert_allclose(padded.variance, whole.variance, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(linear.mean, whole.mean, rtol=1e-5)
    assert np.all(whole.variance > 0) and whole.num_images == 7
    # The estimator's variance is at least the spread of the per-t means around their average.
    assert whole.estimator_std**2 >= np.var(whole.mean) - 1e-9
