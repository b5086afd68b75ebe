"""The benchmark scripts' smoke runs, as CI runs them, and their light dependencies."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packages a bare accelerator machine may lack: the benchmarks must not import them.
TRAINING_SYSTEM_ONLY = ("grain", "orbax", "tensorflow_datasets", "ml_collections", "tensorboardX")


@pytest.mark.slow
def test_smoke_run_writes_every_field(tmp_path, cli):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--smoke", "--json", str(out)],
        cwd=ROOT, env=cli.env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| train images/s (jit, batch 8) |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["environment"]["backend"] == "cpu"
    assert result["matmul_peak"]["flops_per_sec"] > 0
    train = result["train"]["jit"]
    for field in ("images_per_sec", "step_s", "compile_s", "flops_per_step", "peak_fraction",
                  "compiled_peak_bytes", "process_max_rss_bytes"):  # fmt: skip
        assert train[field] > 0, (field, train)
    assert train["peak_fraction"] < 1.0
    assert train["flops_source"] == "lowered"
    for section in ("eval", "sampling"):
        assert result[section]["images_per_sec"] > 0, result[section]
        assert result[section]["compile_s"] > 0
    assert result["sampling"]["num_steps"] == 10
    assert not result["skipped"] and "incomplete" not in result


@pytest.mark.slow
def test_benchmarks_import_no_training_system_packages(cli):
    code = (
        "import sys; from benchmarks import common; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_SYSTEM_ONLY!r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cli.env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def _run(cli, args, timeout=600, **env):
    """``python ARGS`` as the command line's subprocesses run (``cli.env()``: one CPU device,
    as a user has); its stdout."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=cli.env(**env), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_gpu_script_smoke_prints_one_json_line_per_figure(tmp_path, cli):
    # One dtype and one sampler beside ancestral: each figure's code path, few compilations.
    out = tmp_path / "gpu.jsonl"
    flags = ["--smoke", "--out", str(out), "--dtypes", "float32", "--few_step", "no_such:2"]
    stdout = _run(cli, ["benchmarks/gpu.py", *flags], VDM_ORIGINAL="")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(x) for x in stdout.splitlines() if x.startswith("{")] == lines
    by_figure = {}
    for line in lines:
        assert {"figure", "value", "unit", "device_kind", "date"} <= set(line), line
        by_figure.setdefault(line["figure"], []).append(line)
    assert by_figure["matmul_peak"][0]["value"] > 0
    for figure in ("train_images_per_sec", "train_peak_fraction", "train_compile_s",
                   "train_compiled_peak_bytes"):  # fmt: skip
        assert [x["dtype"] for x in by_figure[figure]] == ["float32"]
        assert all(x["value"] > 0 for x in by_figure[figure]), by_figure[figure]
    assert by_figure["original_train_images_per_sec"][0]["unit"] == "skipped"
    sampling = {x["sampler"]: x for x in by_figure["sampling_images_per_sec"]}
    assert sampling["ancestral"]["value"] > 0 and sampling["ancestral"]["num_steps"] == 4
    assert sampling["no_such"]["unit"] == "skipped"
    assert by_figure["eval_images_per_sec"][0]["value"] > 0
    assert "error" not in {x["unit"] for x in lines}


def test_side_by_side_without_the_original_code_says_so(capsys):
    from benchmarks import side_by_side

    assert "skipped" in side_by_side.main(["--original", "/nonexistent"])
    stdout = capsys.readouterr().out
    assert "skipped: no model_vdm.py at '/nonexistent'" in stdout
    assert "https://github.com/google-research/vdm" in stdout


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("VDM_ORIGINAL"),
    reason="set VDM_ORIGINAL to a checkout of google-research/vdm to compare with it",
)
def test_side_by_side_smoke_against_the_original_code(tmp_path, cli):
    out = tmp_path / "side.json"
    stdout = _run(cli, ["benchmarks/side_by_side.py", "--smoke", "--json", str(out)],
                  VDM_ORIGINAL=os.environ["VDM_ORIGINAL"])  # fmt: skip
    result = json.loads(out.read_text())
    for key in ("train_speed_jit", "train_speed_pmap", "eval_speed", "sampling_speed",
                "train_compile_jit", "train_peak_memory_jit"):  # fmt: skip
        assert result["ratios"][key] > 0, result["ratios"]
    assert "| train images/s (jit vs jit, batch 4) |" in stdout


@pytest.mark.slow
def test_profile_smoke_gives_shares_of_the_traced_operations(tmp_path, cli):
    out = tmp_path / "profile.json"
    stdout = _run(cli, ["benchmarks/profile_step.py", "--smoke", "--programs", "eval", "--json",
                   str(out)], VDM_ORIGINAL="")  # fmt: skip
    assert "### eval" in stdout and "| kind: convolutions |" in stdout
    (ours,) = json.loads(out.read_text())["results"]["eval"].values()
    for grouping in ("kind", "direction", "part"):
        assert sum(ours[grouping].values()) == pytest.approx(1.0), ours[grouping]
    # The score network's convolutions and GroupNorm are traced and found in the HLO.
    assert ours["kind"]["convolutions"] > 0 and ours["part"]["GroupNorm"] > 0, ours
    assert ours["direction"] == {"outside the gradient": pytest.approx(1.0)}
    assert ours["gflops"] > 0 and ours["work_s_per_call"] > 0
