"""The one config schema: its table, the base config built from it, the layer direction, and
the command line that reads it (show_config on a run, the help text)."""

import ast
import json
import re
from pathlib import Path

import ml_collections
import pytest

from vdm_jax import cli as command_line
from vdm_jax.configs import base, digits
from vdm_jax.errors import UserError
from vdm_jax.training import schema

REPO = Path(__file__).resolve().parent.parent
SPHINX = re.compile(r":[a-z]+:`|``")


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names, at any depth
    (``from vdm_jax import configs`` counts as ``vdm_jax.configs``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def test_the_training_layer_never_imports_the_configs_or_the_command_line():
    files = sorted((REPO / "vdm_jax" / "training").glob("*.py"))
    assert REPO / "vdm_jax" / "training" / "schema.py" in files
    upward = {
        str(f.relative_to(REPO)): sorted(
            m for m in _imported_modules(f) if re.match(r"vdm_jax\.(configs|cli)\b", m)
        )
        for f in files
    }
    assert upward == {name: [] for name in upward}
    # The check sees an upward import where there is one.
    assert _imported_modules(REPO / "vdm_jax" / "configs" / "run.py") >= {"vdm_jax.training"}


def test_every_field_has_each_column_and_the_base_config_is_the_defaults():
    assert len(schema.FIELDS) == len({f.name for f in schema.FIELDS})
    for f in schema.FIELDS:
        assert re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)?", f.name), f.name
        assert f.type in (bool, int, float, str, tuple), f
        assert f.default is None or isinstance(f.default, f.type), f
        assert f.default is not None or f.type is str, f
        assert f.rule is None or (callable(f.rule.check) and f.rule.expected), f
        assert f.meaning and "\n" not in f.meaning and not SPHINX.search(f.meaning), f
        assert isinstance(f.fixed_by_checkpoint, bool), f
    flat = schema.flatten(base.get_config().to_dict())
    assert list(flat) == sorted(schema.field_names())  # to_dict sorts each section's keys
    assert flat == schema.field_defaults()
    schema.check_config(base.get_config())  # every default obeys its own rule
    # A field without a default is still typed: the command line can set it.
    config = base.get_config()
    config.data.data_dir = "/data"
    with pytest.raises(TypeError):
        config.data.data_dir = 3


def test_every_choice_is_listed_in_the_meaning():
    meanings = schema.field_meanings()
    chosen = [f for f in schema.FIELDS if f.rule is not None and f.rule.choices]
    assert {"data.name", "model.schedule", "objective.weighting", "sampling.sampler"} <= {
        f.name for f in chosen
    }
    for f in chosen:
        assert meanings[f.name].startswith(" | ".join(f.rule.choices) + ": "), f.name
        for option in f.rule.choices:
            assert f.rule.check(option)
    assert "monotonic_unnormalised" in meanings["model.schedule"]
    assert not schema.field("model.schedule").rule.check("monotonic_unnormalized")


def test_checkpoint_fixed_fields_are_the_resume_keys():
    keys = schema.resume_keys()
    assert {"seed", "data.name", "training.batch_size", "optimizer.clip_norm"} <= set(keys)
    assert {"model.n_embd", "model.schedule", "objective.noise_bins"} <= set(keys)
    # Changing how the same function is computed, or only the schedule's initial endpoints,
    # leaves a run resumable.
    assert not {"model.dtype", "model.attention", "model.gamma_min", "eval.batch_size"} & set(keys)
    saved = digits.get_config("smoke").to_dict()
    given = digits.get_config()  # n_embd 32 where the run has 16
    given.eval.batch_size = 5
    config = schema.for_trained_run(given, saved)
    assert (config.model.n_embd, config.eval.batch_size) == (16, 5)
    with pytest.raises(UserError, match=r"model\.n_embd=32 disagrees with the trained run"):
        schema.for_trained_run(given, saved, explicit=("model.n_embd",))


def test_field_lookup_names_the_closest_field():
    assert schema.field("model.n_embd").default == 128
    with pytest.raises(UserError, match=r"did you mean model\.n_embd\?"):
        schema.field("model.n_embdd")
    config = ml_collections.ConfigDict(base.get_config().to_dict())
    with config.unlocked():
        config.model.n_embdd = 8
    with pytest.raises(UserError, match=r"unknown config field model\.n_embdd .*model\.n_embd\?"):
        schema.check_config(config)


def test_plain_text_help_has_no_sphinx_markup():
    text = command_line.plain_text(command_line.__doc__)
    assert SPHINX.search(command_line.__doc__) and not SPHINX.search(text)
    assert "vdm_jax.training.schema.for_trained_run" in text
    assert not re.search(r"::$", text, re.M)


@pytest.mark.slow
def test_helpshort_prints_plain_text(tmp_path, cli):
    proc = cli.run("--helpshort", cwd=tmp_path)  # absl exits with 1 after the help
    assert "--config.SECTION.FIELD=VALUE" in proc.stdout and "--workdir" in proc.stdout
    assert not SPHINX.search(proc.stdout), proc.stdout


def test_show_config_on_a_run_applies_the_run_s_rules(tmp_path, cli, capsys):
    """show_config given a run's workdir shows what eval would use: the run's values of the
    fields its checkpoint fixes, and one error line for an override that disagrees."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(digits.get_config("smoke").to_dict()))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.in_process("--mode=show_config", f"--workdir={run}", "--config.model.n_embd=8")
    bad = capsys.readouterr()
    assert exited.value.code == 1 and not bad.out
    assert bad.err.strip().splitlines() == [
        "error: --config.model.n_embd=8 disagrees with the trained run, which has "
        "model.n_embd=16: the run's checkpoint fixes it; drop the flag"
    ]
    cli.in_process(
        "--mode=show_config", "--config=digits", f"--workdir={run}", "--config.eval.batch_size=5"
    )
    shown = capsys.readouterr().out
    assert re.search(r"^model\.n_embd = 16 +\[default 128\]", shown, re.M)
    assert re.search(r"^eval\.batch_size = 5 +\[default 256\]", shown, re.M)
