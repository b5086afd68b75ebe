"""The benchmark suite's one-step smoke run, as CI runs it, and its light dependencies."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packages a bare accelerator machine may lack: the benchmarks must not import them.
TRAINING_SYSTEM_ONLY = ("grain", "orbax", "tensorflow_datasets", "ml_collections", "tensorboardX")


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the command as a user runs it: no fake devices
    return env


def test_smoke_run_writes_every_field(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--smoke", "--json", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
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


def test_benchmarks_import_no_training_system_packages():
    code = (
        "import sys; from benchmarks import common; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_SYSTEM_ONLY!r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
