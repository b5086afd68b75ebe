"""The run report drawn: what a VDM run learned, as PNG plots and one self-contained HTML page.

The figures' numbers come from :mod:`vdm_jax.training.report_data`.

The plotting functions take plain records and arrays, so they work for any run:

- :func:`plot_schedule`: gamma(t), with log SNR(t) = -gamma(t) on the right axis, of the
  learned schedule against the one the run started from, the endpoints gamma(0) and gamma(1)
  marked; and dgamma/dt, the weight the continuous-time diffusion loss gives each t.
- :func:`plot_training`: train and test bits/dim with the three terms of the bound (prior,
  reconstruction, diffusion) over the steps, the learned endpoints, the learning rate and the
  gradient norm, from the records of ``metrics.jsonl`` (:func:`.read_metrics`).
- :func:`plot_loss_by_time`: the diffusion loss per time bin, its mean and its spread over a
  batch of test images (:func:`.diffusion_loss_by_time`), for the learned schedule and for the
  linear schedule with the same endpoints. In continuous time the expected loss depends only
  on the endpoints (the paper's invariance to the noise schedule), so the two means integrate
  to the same figure; what a learned schedule changes is the variance of the one-sample
  estimator.
- :func:`write_html`: one page with every image embedded (base64 ``data:`` URIs, no script,
  no network), which opens from disk.

Matplotlib is used through :class:`matplotlib.figure.Figure` with the Agg canvas, without
``pyplot``: nothing here changes the caller's backend or global state.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.errors import UserError
from vdm_jax.training.report_data import LossByTime, diffusion_loss_by_time, read_metrics

__all__ = ["plot_loss_by_time", "plot_schedule", "plot_training", "write_html", "write_report"]

# One colour per term of the bound, the same in every figure.
_TERM_COLOURS = {
    "bpd": "black",
    "prior_bpd": "tab:blue",
    "reconstruction_bpd": "tab:orange",
    "diffusion_bpd": "tab:green",
}
_TERM_LABELS = {
    "bpd": "bound (sum)",
    "prior_bpd": "prior",
    "reconstruction_bpd": "reconstruction",
    "diffusion_bpd": "diffusion",
}


def _figure(nrows: int, ncols: int, width: float, height: float):
    from matplotlib.figure import Figure  # imported here: slow import, only the report needs it

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_schedule(
    t: np.ndarray,
    gamma: np.ndarray,
    path: str | os.PathLike,
    *,
    initial: np.ndarray | None = None,
    title: str = "noise schedule",
) -> str:
    """Plot a schedule gamma(t) = -log SNR(t) and its derivative; writes a PNG.

    Args:
      t: increasing times in [0, 1], ``[K]`` (a few hundred points: the derivative is taken
        by finite differences).
      gamma: gamma(t) of the schedule, ``[K]``.
      path: the PNG to write.
      initial: gamma(t) of the schedule the run started from, ``[K]``, drawn dashed.
      title: the figure's title.

    Returns:
      ``path``.
    """
    t = np.asarray(t, np.float64)
    curves = [("learned", np.asarray(gamma, np.float64), "-")]
    if initial is not None:
        curves.append(("initial", np.asarray(initial, np.float64), "--"))
    fig, axes = _figure(1, 2, 10, 3.8)
    left, right = axes[0]
    for label, g, style in curves:
        colour = "tab:purple" if label == "learned" else "grey"
        left.plot(t, g, style, color=colour, label=label)
        right.plot(t, np.gradient(g, t), style, color=colour, label=label)
    g = curves[0][1]
    # Inside the axes, beside each endpoint: gamma(0) up and right, gamma(1) down and left.
    for x, y, offset, align in ((t[0], g[0], (8, 4), "left"), (t[-1], g[-1], (-8, -12), "right")):
        left.plot([x], [y], "o", color="tab:purple")
        left.annotate(
            f"gamma({x:g}) = {y:.2f}", (x, y), textcoords="offset points", xytext=offset, ha=align
        )
    left.set_xlabel("t")
    left.set_ylabel("gamma(t) = -log SNR(t)")
    left.set_title(title)
    left.grid(alpha=0.3)
    left.legend(loc="lower right")
    # log SNR = -gamma: the same curve read on the right axis.
    snr_axis = left.secondary_yaxis("right", functions=(np.negative, np.negative))
    snr_axis.set_ylabel("log SNR(t)")
    right.set_xlabel("t")
    right.set_ylabel("dgamma/dt")
    right.set_title("dgamma/dt: the diffusion loss's weight at t")
    _log_scale_if_wide(right, np.gradient(g, t))
    right.grid(alpha=0.3)
    right.legend()
    return _save(fig, path)


def _log_scale_if_wide(ax, values: np.ndarray, ratio: float = 20.0) -> None:
    """A log y axis when the positive values span more than ``ratio`` (else log ticks on a
    narrow range only obscure the numbers)."""
    values = np.asarray(values)
    if values.size and np.all(values > 0) and values.max() > ratio * values.min():
        ax.set_yscale("log")


def _series(records: Sequence[Mapping[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that carry a finite ``key``."""
    pairs = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs, strict=True)
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def plot_training(
    records: Sequence[Mapping[str, float]], path: str | os.PathLike, *, split: str = "test"
) -> str:
    """Plot a run's metrics over the training steps; writes a PNG.

    Four panels: train bits/dim (lines) and ``split`` bits/dim (dots) with the three terms of
    the bound, on a log scale; the learned endpoints gamma(0) and gamma(1); the learning rate;
    the gradient norm (log scale).

    Args:
      records: the records of ``metrics.jsonl`` (:func:`.read_metrics`).
      path: the PNG to write.
      split: the evaluation split whose records (``'<split>/bpd'``, ...) are drawn.

    Returns:
      ``path``.

    Raises:
      UserError: no record carries a train bits/dim (nothing to plot yet).
    """
    if not _series(records, "bpd")[0].size:
        raise UserError(
            "the metrics hold no training record yet: let the run reach its first "
            "training.log_every step"
        )
    fig, axes = _figure(2, 2, 11, 7.5)
    from matplotlib.lines import Line2D

    ax = axes[0, 0]
    drawn = []
    for key, colour in _TERM_COLOURS.items():
        # The sum is drawn wide and underneath: it often coincides with the diffusion term.
        wide = key == "bpd"
        style = {"lw": 3.0, "alpha": 0.35, "zorder": 1} if wide else {"lw": 1.2, "zorder": 2}
        steps, values = _series(records, key)
        ax.plot(steps, values, "-", color=colour, **style)
        drawn.append(values)
        steps, values = _series(records, f"{split}/{key}")
        ax.plot(steps, values, "o", color=colour, ms=6, mfc="white", zorder=3)
        drawn.append(values)
    _log_scale_if_wide(ax, np.concatenate(drawn))
    # One entry per term (colour) and one per split (line or circle), outside the data.
    handles = [Line2D([], [], color=c, lw=2) for c in _TERM_COLOURS.values()]
    handles += [
        Line2D([], [], color="grey"),
        Line2D([], [], ls="", marker="o", color="grey", mfc="white"),
    ]
    labels = [*_TERM_LABELS.values(), "train", split]
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("bits/dim and the three terms of the bound")
    ax.set_ylabel("bits/dim")

    ax = axes[0, 1]
    for key, label in (("gamma_0", "gamma(0)"), ("gamma_1", "gamma(1)")):
        ax.plot(*_series(records, key), label=label)
    ax.set_title("learned endpoints")
    ax.set_ylabel("gamma")
    ax.legend()

    ax = axes[1, 0]
    ax.plot(*_series(records, "lr"), color="tab:red")
    ax.set_title("learning rate")

    ax = axes[1, 1]
    steps, values = _series(records, "grad_norm")
    ax.plot(steps, values, color="tab:brown")
    _log_scale_if_wide(ax, values)
    ax.set_title("gradient norm")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_loss_by_time(
    learned: LossByTime, path: str | os.PathLike, *, linear: LossByTime | None = None
) -> str:
    """Plot the diffusion loss per time bin, mean and standard deviation over the images.

    Args:
      learned: the loss under the run's schedule (:func:`.diffusion_loss_by_time`).
      path: the PNG to write.
      linear: the loss under the linear schedule with the same endpoints, drawn dashed.

    Returns:
      ``path``.
    """
    fig, axes = _figure(1, 2, 10, 3.8)
    for name, result, style in (
        ("learned schedule", learned, "-"),
        ("linear, same endpoints", linear, "--"),
    ):
        if result is None:
            continue
        label = f"{name}: E_t = {result.expected:.4f}, estimator std {result.estimator_std:.3f}"
        axes[0, 0].plot(result.t, result.mean, style + "o", ms=3, label=label)
        axes[0, 1].plot(result.t, np.sqrt(result.variance), style + "o", ms=3, label=name)
    axes[0, 0].set_title(f"diffusion loss at t, mean over {learned.num_images} test images")
    axes[0, 0].set_ylabel("bits/dim")
    axes[0, 0].legend(fontsize=8)
    axes[0, 1].set_title("its standard deviation over the images")
    axes[0, 1].set_ylabel("bits/dim")
    for ax in axes.flat:
        ax.set_xlabel("t")
        _log_scale_if_wide(ax, np.concatenate([line.get_ydata() for line in ax.get_lines()]))
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _data_uri(png_path: str) -> str:
    with open(png_path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


_STYLE = """
body { font-family: sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em;
       color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; } td, th { padding: 0.2em 1em 0.2em 0; text-align: left; }
th { font-weight: normal; color: #555; } img { max-width: 100%; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
.samples { display: flex; flex-wrap: wrap; gap: 1em; }
.samples img { image-rendering: pixelated; width: 260px; }
pre { background: #f6f6f6; padding: 1em; overflow: auto; font-size: 0.85em; }
"""


def write_html(
    path: str | os.PathLike,
    *,
    title: str,
    summary: Mapping[str, str],
    figures: Sequence[tuple[str, str]],
    samples: Sequence[tuple[str, str]] = (),
    config_text: str = "",
) -> str:
    """Write one self-contained HTML page: every image embedded, no script, no link out.

    Args:
      path: the HTML file to write.
      title: the page's title.
      summary: final figures, name -> formatted value, shown as a table.
      figures: ``(caption, png_path)`` of the plots, in page order.
      samples: ``(caption, png_path)`` of sample grids, shown side by side at their pixel size
        scaled up without smoothing.
      config_text: the run's config, shown as preformatted text.

    Returns:
      ``path``.
    """
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<h2>Final figures</h2><table>",
        *(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary.items()),
        "</table>",
    ]
    for caption, png in figures:
        parts.append(f'<figure><img src="{_data_uri(png)}" alt="{esc(caption)}">')
        parts.append(f"<figcaption>{esc(caption)}</figcaption></figure>")
    if samples:
        parts.append('<h2>Samples written during training</h2><div class="samples">')
        for caption, png in samples:
            parts.append(f'<figure><img src="{_data_uri(png)}" alt="{esc(caption)}">')
            parts.append(f"<figcaption>{esc(caption)}</figcaption></figure>")
        parts.append("</div>")
    if config_text:
        parts.append("<h2>Config</h2><details><summary>the run's config (click to open)</summary>")
        parts.append(f"<pre>{esc(config_text)}</pre></details>")
    parts.append("</body></html>")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return path


def _sample_grids(workdir: str) -> list[tuple[int, str]]:
    """(step, path) of the PNG grids in ``workdir/samples``, by step then name (a file name
    holds its step as ``step<N>``)."""
    folder = os.path.join(workdir, "samples")
    if not os.path.isdir(folder):
        return []
    grids = []
    for name in os.listdir(folder):
        found = re.search(r"step(\d+)", name)
        if name.endswith(".png") and found:
            grids.append((int(found.group(1)), os.path.join(folder, name)))
    return sorted(grids)


def _summary(records, split, step, learned, linear, num_params) -> dict[str, str]:
    """The page's table of final figures: the last evaluation and the last train record."""
    summary = {"checkpoint step": f"{step}", "parameters": f"{num_params:,}"}
    evals = [r for r in records if f"{split}/bpd" in r]
    if evals:
        last = evals[-1]
        bpd = f"{last[f'{split}/bpd']:.4f} bits/dim"
        if f"{split}/bpd_stderr" in last:
            bpd += f" +- {last[f'{split}/bpd_stderr']:.4f}"
        summary[f"{split} bound (step {last['step']})"] = bpd
        terms = [f"{last.get(f'{split}/{k}', math.nan):.4f}" for k in list(_TERM_LABELS)[1:]]
        summary[f"{split} prior / reconstruction / diffusion"] = " / ".join(terms) + " bits/dim"
        baseline = last.get(f"{split}/independent_pixel_baseline_bpd")
        if baseline is not None:
            summary["per-pixel independent baseline"] = f"{baseline:.4f} bits/dim"
    trains = [r for r in records if "bpd" in r]
    if trains:
        last = trains[-1]
        summary[f"train bound (step {last['step']})"] = f"{last['bpd']:.4f} bits/dim"
        if "gamma_0" in last:
            summary["gamma(0), gamma(1)"] = f"{last['gamma_0']:.3f}, {last['gamma_1']:.3f}"
    for name, result in (("learned schedule", learned), ("linear schedule", linear)):
        summary[f"diffusion term over the t bins, {name}"] = (
            f"{result.expected:.4f} bits/dim (one-sample estimator std {result.estimator_std:.4f})"
        )
    return summary


def write_report(
    workdir: str,
    *,
    model: Any,
    variables: Any,
    initial_variables: Any,
    step: int,
    images: np.ndarray,
    key: jax.Array,
    labels: np.ndarray | None = None,
    split: str = "test",
    title: str = "VDM run report",
    config_json: str = "",
    num_bins: int = 32,
    batch_size: int = 256,
) -> str:
    """The report of a training run: PNGs and ``index.html`` in ``workdir/report/``.

    Reads ``workdir/metrics.jsonl`` and the sample grids in ``workdir/samples/``; evaluates
    the diffusion loss per time bin on ``images`` (under a progress bar); writes
    ``schedule.png``, ``training.png``, ``loss_by_time.png`` and ``index.html``, and adds the
    schedule plot and the latest sample grid to TensorBoard (``workdir/tensorboard``) as images
    at ``step``. :func:`vdm_jax.training.trainer.report` calls it with a run's checkpoint.

    Args:
      workdir: the run's folder.
      model: the run's :class:`~vdm_jax.models.vdm.VDM`.
      variables: the variables to report on, ``{'params': ema_params}``.
      initial_variables: the variables the run started from (for the initial schedule).
      step: the step of ``variables``.
      images: integer evaluation images ``[N, H, W, C]`` for the per-t loss.
      key: the per-t loss's noise.
      labels: int ``[N]`` labels for a class-conditional model, or None.
      split: the evaluation split of the metrics (``'<split>/bpd'``, ...).
      title: the page's title.
      config_json: the run's config, shown on the page.
      num_bins: time bins of the per-t diffusion loss.
      batch_size: images per compiled call of the per-t loss.

    Returns:
      The path of ``index.html``.

    Raises:
      UserError: no metrics file in ``workdir``, or no training record in it.
    """
    from tqdm import tqdm

    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    out = os.path.join(workdir, "report")
    t = np.linspace(0.0, 1.0, 257)
    learned_gamma, initial_gamma = (
        np.asarray(model.apply(v, jnp.asarray(t, jnp.float32), method=model.gamma))
        for v in (variables, initial_variables)
    )
    schedule_png = plot_schedule(
        t, learned_gamma, os.path.join(out, "schedule.png"), initial=initial_gamma,
        title=f"{type(model.schedule).__name__} at step {step}",
    )  # fmt: skip
    training_png = plot_training(records, os.path.join(out, "training.png"), split=split)

    batch_size = min(batch_size, len(images))
    per_t: dict[str, Any] = dict(labels=labels, num_bins=num_bins, batch_size=batch_size)
    total = 2 * num_bins * math.ceil(len(images) / batch_size)
    with tqdm(total=total, desc="diffusion loss per t", unit="batch", disable=None) as bar:
        # The same key: both schedules see the same noise, so their difference is the schedule's.
        learned = diffusion_loss_by_time(model, variables, images, key, progress=bar, **per_t)
        linear = diffusion_loss_by_time(
            model, variables, images, key, linear=True, progress=bar, **per_t
        )
    loss_png = plot_loss_by_time(learned, os.path.join(out, "loss_by_time.png"), linear=linear)

    grids = _sample_grids(workdir)
    _to_tensorboard(workdir, step, schedule_png, grids[-1][1] if grids else None)
    num_params = sum(x.size for x in jax.tree.leaves(variables))
    return write_html(
        os.path.join(out, "index.html"),
        title=title,
        summary=_summary(records, split, step, learned, linear, num_params),
        figures=[
            ("The learned noise schedule against the one the run started from.", schedule_png),
            (
                "Training: the bound and its terms, the endpoints, learning rate, gradient norm.",
                training_png,
            ),
            (
                f"The diffusion loss at {num_bins} times t over {len(images)} {split} images, "
                "under the learned schedule and the linear one with its endpoints.",
                loss_png,
            ),
        ],
        samples=[(os.path.basename(p), p) for _, p in grids],
        config_text=config_json,
    )


def _to_tensorboard(workdir: str, step: int, schedule_png: str, samples_png: str | None) -> None:
    """The schedule plot and a sample grid as TensorBoard images at ``step``."""
    from PIL import Image
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    try:
        for tag, png in (("report/schedule", schedule_png), ("report/samples", samples_png)):
            if png is not None:
                image = np.asarray(Image.open(png).convert("RGB"))
                writer.add_image(tag, image, step, dataformats="HWC")
    finally:
        writer.close()
