"""Bad input fails early and clearly through the commands users run: the three stage scripts' ``main()`` and
``retroformer`` (CLI ``main``). Each error must name what was wrong and come before any model is loaded or any
episode runs. (Config parsing itself is tested in test_config.py; the trials CLI's flag errors in
test_crash_cli_report.py; each stage's own input checks in its test file.)
"""

from __future__ import annotations

import json

import pytest
from helpers_training import load_script, write_rated_dataset

from retroformer.cli import main as cli_main
from retroformer.errors import ConfigError, DataError

SCRIPTS = ["sft_run", "reward_run", "ppo_run"]


@pytest.fixture
def fake_model(tmp_path):
    """A directory that passes the cheap path checks (it has a config.json) but holds no loadable model: a test that
    gets past the input checks into model loading fails loudly instead of passing."""
    d = tmp_path / "not-really-a-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    rm = tmp_path / "not-really-a-reward-model"
    rm.mkdir()
    (rm / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"], "num_labels": 1})
    )
    return str(d)


def stage_args(script: str, model: str, dataset: str, out: str) -> list[str]:
    args = ["--model", model, "--dataset", dataset, "--output_dir", out]
    if script == "ppo_run":
        reward_model = model.replace("not-really-a-model", "not-really-a-reward-model")
        args += ["--reward_model", reward_model]
    return args


# --- recipes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_stage_script_rejects_invalid_yaml(script, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: runs/tiny/lm\nlora: {r: 2\n")  # unclosed mapping
    with pytest.raises(ConfigError, match=r"recipe\.yaml' is not valid YAML"):
        load_script(script).main(["--config", str(recipe)])


@pytest.mark.parametrize(
    ("script", "yaml_text", "message"),
    [
        ("sft_run", "lora:\n  alpah: 8\n", r"unknown config key lora\.'alpah'.*Did you mean 'alpha'"),
        ("reward_run", "eval_fracton: 0.1\n", r"unknown config key 'eval_fracton'.*Did you mean 'eval_fraction'"),
        ("ppo_run", "kl_coeff: 0.1\n", r"unknown config key 'kl_coeff'.*Did you mean 'kl_coef'"),
    ],
)
def test_stage_script_rejects_unknown_recipe_keys_with_a_suggestion(script, yaml_text, message, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_script(script).main(["--config", str(recipe)])


# --- data and model paths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_stage_script_names_a_missing_dataset_before_loading_any_model(script, tmp_path, fake_model):
    missing = tmp_path / "runs" / "demo" / "datasets" / "rated_reflectons"
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"rated_reflectons'? does not exist"):
        load_script(script).main(stage_args(script, fake_model, str(missing), str(out)))
    assert not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_stage_script_given_the_records_file_instead_of_the_dataset_says_so(script, tmp_path, fake_model):
    # A likely slip: passing trials/episodes.jsonl where the exported dataset directory is expected.
    records = tmp_path / "runs" / "demo" / "trials" / "episodes.jsonl"
    records.parent.mkdir(parents=True)
    records.write_text("{}\n")
    with pytest.raises(DataError, match=r"episodes\.jsonl.*(save_to_disk|not a (saved )?dataset)"):
        load_script(script).main(stage_args(script, fake_model, str(records), str(tmp_path / "out")))


@pytest.mark.parametrize("script", SCRIPTS)
def test_stage_script_names_a_missing_model_before_reading_data(script, tmp_path):
    dataset = write_rated_dataset(tmp_path / "data")
    missing = str(tmp_path / "models" / "retro-lm")
    with pytest.raises(ConfigError, match=r"model='.*retro-lm' does not exist"):
        load_script(script).main(stage_args(script, missing, dataset, str(tmp_path / "out")))


def trials_args(tmp_path, *extra: str) -> list[str]:
    return [
        "trials", "--runs_dir", str(tmp_path / "runs"), "--run_name", "bad", "--env.options", "{num_tasks: 3}",
        "--actor.kind", "plan", "--reflector.llm.backend", "scripted",
        "--reflector.llm.scripted_policy", "synthetic-clue", *extra,
    ]  # fmt: skip


def count_episode_starts(monkeypatch) -> list[int]:
    from retroformer.envs.synthetic import SyntheticSuite

    made: list[int] = []
    real_make = SyntheticSuite.make

    def make(self):
        made.append(1)
        return real_make(self)

    monkeypatch.setattr(SyntheticSuite, "make", make)
    return made


@pytest.mark.parametrize("role", ["actor", "reflector"])
def test_trials_with_a_missing_hf_model_fail_before_any_episode(role, tmp_path, monkeypatch, capsys):
    made = count_episode_starts(monkeypatch)
    missing = str(tmp_path / "models" / "no-such-lm")
    extra = ["--reflector.llm.backend", "hf", "--reflector.llm.model", missing]
    if role == "actor":
        extra = ["--actor.kind", "react", "--actor.llm.backend", "hf", "--actor.llm.model", missing]
    assert cli_main(trials_args(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert f"{role}.llm.model='{missing}' does not exist" in err
    assert made == [], "an episode started before the bad model path was reported"
    assert not (tmp_path / "runs" / "bad" / "trials" / "episodes.jsonl").exists()


def test_trials_recipe_with_a_misspelt_environment_suggests_the_closest(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh checkout: the default reflector model runs/tiny/lm does not exist here
    recipe = tmp_path / "r.yaml"
    recipe.write_text("env:\n  name: synthtic\n")
    assert cli_main(["trials", "--config", str(recipe), "--runs_dir", str(tmp_path / "runs")]) == 2
    assert "unknown environment 'synthtic'. Did you mean 'synthetic'?" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --- records --------------------------------------------------------------------------------------------------------


def test_a_corrupt_record_line_in_the_middle_is_named_by_resume_and_report_and_left_untouched(tmp_path, capsys):
    assert cli_main(trials_args(tmp_path)) == 0
    run = tmp_path / "runs" / "bad"
    path = run / "trials" / "episodes.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) >= 4
    lines[2] = lines[2][: len(lines[2]) // 2]  # a torn line in the middle, not at the end
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    capsys.readouterr()

    assert cli_main(trials_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: not valid JSON" in err and "Fix or remove the line" in err
    assert cli_main(["report", str(run), "--out", str(tmp_path / "report")]) == 2
    assert f"{path}:3: not valid JSON" in capsys.readouterr().err
    assert path.read_bytes() == before  # only a partial *last* line is ever repaired


def test_a_record_of_the_wrong_shape_is_named_with_its_line(tmp_path, capsys):
    assert cli_main(trials_args(tmp_path)) == 0
    path = tmp_path / "runs" / "bad" / "trials" / "episodes.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(1, json.dumps({"task_id": "vault-0-000", "note": "hand-edited"}))
    path.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert cli_main(trials_args(tmp_path)) == 2
    assert f"{path}:2: " in capsys.readouterr().err


@pytest.mark.parametrize("name", ["..", "."])
def test_a_run_name_that_is_not_a_plain_directory_name_is_refused(name, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = trials_args(tmp_path)
    args[args.index("--run_name") + 1] = name
    assert cli_main(args) == 2
    assert "run_name must be a plain directory name" in capsys.readouterr().err
    assert not (tmp_path / "trials").exists() and not (runs / "trials").exists()
