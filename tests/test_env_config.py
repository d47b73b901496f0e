"""The `.env` variables of the original Retroformer README: OPENAI_MODEL, CKPT_DIR and DATA_DIR.

Every command resolves its config with one precedence: command line > YAML recipe > .env > built-in default. The stage
configs say where each of these values came from in a header of the config they write.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from retroformer.cli import fill_env_paths, load_stage_config, main
from retroformer.config import read_sources, resolve_config, save_config
from retroformer.errors import ConfigError
from retroformer.records import read_records
from retroformer.testing import FakeOpenAIServer
from retroformer.testing.vault_policy import vault_reply
from retroformer.training.ppo import PPORunConfig
from retroformer.training.sft import SFTStageConfig
from retroformer.trials import TrialsConfig

ROOT = Path(__file__).resolve().parents[1]
ENV_VARS = ("CKPT_DIR", "DATA_DIR", "OPENAI_MODEL", "HOTPOTQA_DATA", "ALFWORLD_DATA")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """CKPT_DIR and DATA_DIR set to fresh folders; DATA_DIR holds an (empty) rated_reflections folder."""
    ckpt, data = tmp_path / "ckpt", tmp_path / "data"
    (data / "rated_reflections").mkdir(parents=True)
    ckpt.mkdir()
    monkeypatch.setenv("CKPT_DIR", str(ckpt))
    monkeypatch.setenv("DATA_DIR", str(data))
    return ckpt, data


def write_recipe(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ----------------------------------------------------------------------------------------------------------------------
# Precedence: command line > YAML recipe > .env > default


def test_ckpt_dir_and_data_dir_fill_a_stage_config_and_say_so(dirs):
    ckpt, data = dirs
    cfg, sources = load_stage_config(SFTStageConfig, ["--model", "m"], "sft_run.py", stage="sft")
    assert cfg.output_dir == str(ckpt / "sft")
    assert cfg.dataset == [str(data / "rated_reflections")]
    assert sources["output_dir"] == ".env CKPT_DIR (sft/)"
    assert sources["dataset"] == ".env DATA_DIR (rated_reflections/)"
    assert sources["model"] == "command line"


def test_command_line_beats_recipe_beats_env(dirs, tmp_path):
    ckpt, _ = dirs
    recipe = write_recipe(tmp_path / "r.yaml", {"model": "m", "output_dir": str(tmp_path / "from-recipe")})
    cfg, sources = load_stage_config(SFTStageConfig, ["--config", recipe], "sft_run.py", stage="sft")
    assert cfg.output_dir == str(tmp_path / "from-recipe")
    assert sources["output_dir"] == f"recipe {recipe}"
    cfg, sources = load_stage_config(
        SFTStageConfig, ["--config", recipe, "--output_dir", str(tmp_path / "cli")], "sft_run.py", stage="sft"
    )
    assert cfg.output_dir == str(tmp_path / "cli")
    assert sources["output_dir"] == "command line"


def test_built_in_default_when_env_is_unset(tmp_path):
    cfg, sources = resolve_config(
        PPORunConfig, ["--model", "m", "--dataset", "d", "--reward_model", "r"], env_defaults={"output_dir": (None, "")}
    )
    assert cfg.output_dir == "runs/ppo"  # the built-in default
    assert sources == {"output_dir": "default"}


def test_ppo_finds_the_previous_stages_below_ckpt_dir(dirs):
    ckpt, _ = dirs
    (ckpt / "base").mkdir()
    (ckpt / "reward").mkdir()
    # No SFT adapter yet: PPO starts from a fresh adapter.
    cfg, sources = load_stage_config(PPORunConfig, [], "ppo_run.py", stage="ppo")
    assert (cfg.model, cfg.reward_model, cfg.output_dir) == (
        str(ckpt / "base"),
        str(ckpt / "reward"),
        str(ckpt / "ppo"),
    )
    assert cfg.sft_adapter is None and sources["sft_adapter"] == "default"
    (ckpt / "sft").mkdir()
    (ckpt / "sft" / "adapter_config.json").write_text("{}")
    cfg, sources = load_stage_config(PPORunConfig, [], "ppo_run.py", stage="ppo")
    assert cfg.sft_adapter == str(ckpt / "sft") and sources["sft_adapter"] == ".env CKPT_DIR (sft/)"


def test_saved_config_names_the_sources_and_reads_back_as_a_recipe(tmp_path, dirs):
    cfg, sources = load_stage_config(SFTStageConfig, ["--model", "m"], "sft_run.py", stage="sft")
    path = tmp_path / "out" / "sft_config.yaml"
    save_config(cfg, path, sources)
    assert read_sources(path) == sources
    assert "command line > YAML recipe > .env > built-in default" in path.read_text()
    again, _ = resolve_config(SFTStageConfig, ["--config", str(path)])
    assert again == cfg


# ----------------------------------------------------------------------------------------------------------------------
# Errors: what is missing, and bad paths, before any model is loaded


def test_missing_fields_name_the_env_variable_that_would_supply_them(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"model, dataset, output_dir not set.*--model.*CKPT_DIR.*DATA_DIR"):
        load_stage_config(SFTStageConfig, [], "sft_run.py", stage="sft")
    (tmp_path / "ckpt").mkdir()
    monkeypatch.setenv("CKPT_DIR", str(tmp_path / "ckpt"))
    with pytest.raises(ConfigError, match=r"ppo_run.py: model, dataset not set.*has no base/"):
        load_stage_config(PPORunConfig, [], "ppo_run.py", stage="ppo")


def test_no_data_yet_says_to_run_trials_first(dirs):
    ckpt, data = dirs
    shutil.rmtree(data / "rated_reflections")
    with pytest.raises(
        ConfigError, match=r"no rated reflections at .*rated_reflections \(DATA_DIR.*retroformer trials"
    ):
        load_stage_config(SFTStageConfig, ["--model", "m"], "sft_run.py", stage="sft")
    (data / "rated_reflections").mkdir()
    (ckpt / "base").mkdir()
    with pytest.raises(ConfigError, match=r"no reward model at .*reward \(CKPT_DIR.*reward_run.py"):
        load_stage_config(PPORunConfig, [], "ppo_run.py", stage="ppo")


@pytest.mark.parametrize("var", ["CKPT_DIR", "DATA_DIR"])
def test_bad_env_directory_fails_early(var, tmp_path, monkeypatch):
    monkeypatch.setenv(var, str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=rf"{var}=.*nope.* does not exist; create the directory"):
        load_stage_config(SFTStageConfig, ["--model", "m"], "sft_run.py", stage="sft")
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv(var, str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=rf"{var}=.*file.* is a file, expected a directory"):
        load_stage_config(SFTStageConfig, ["--model", "m"], "sft_run.py", stage="sft")


def test_unwritable_ckpt_dir_fails_early(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_DIR", str(tmp_path))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(ConfigError, match=r"CKPT_DIR=.* is not writable"):
        load_stage_config(SFTStageConfig, ["--model", "m"], "sft_run.py", stage="sft")


# ----------------------------------------------------------------------------------------------------------------------
# OPENAI_MODEL: the actor model of the paper recipes


PAPER_RECIPES = sorted(
    p for env in ("hotpotqa", "alfworld", "webshop") for p in (ROOT / "experiments" / env).glob("*.yaml")
    if p.stem in ("react", "reflexion", "retroformer", "collect")
)  # fmt: skip


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_paper_recipes_take_the_actor_model_from_openai_model(recipe, monkeypatch):
    from retroformer.cli import check_actor_model, trials_env_defaults

    with pytest.raises(ConfigError, match=r"actor.llm.model is not set.*OPENAI_MODEL"):
        cfg, sources = resolve_config(TrialsConfig, ["--config", str(recipe)], env_defaults=trials_env_defaults)
        check_actor_model(cfg, sources)
    monkeypatch.setenv("OPENAI_MODEL", "my-actor-model")
    cfg, sources = resolve_config(TrialsConfig, ["--config", str(recipe)], env_defaults=trials_env_defaults)
    assert cfg.actor.llm.model == "my-actor-model" and sources["actor.llm.model"] == ".env OPENAI_MODEL"
    cfg, sources = resolve_config(
        TrialsConfig, ["--config", str(recipe), "--actor.llm.model", "cli-model"], env_defaults=trials_env_defaults
    )
    assert cfg.actor.llm.model == "cli-model" and sources["actor.llm.model"] == "command line"


def test_openai_model_reaches_the_server_and_the_records(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_MODEL", "env-actor-model")
    monkeypatch.setenv("FAKE_KEY", "sk-SENTINEL-env-config-3b9d")
    server = FakeOpenAIServer(reply=vault_reply)
    with server as url:
        recipe = {
            "run_name": "r", "runs_dir": str(tmp_path / "runs"), "trials": 1, "concurrency": 1,
            "env": {"name": "synthetic", "options": {"num_tasks": 2, "num_doors": 3}},
            "actor": {"kind": "react", "llm": {"backend": "openai", "base_url": url, "api_key_env": "FAKE_KEY"}},
            "reflector": {"kind": "none"},
        }  # fmt: skip
        assert main(["trials", "--config", write_recipe(tmp_path / "r.yaml", recipe)]) == 0
    assert {r.body["model"] for r in server.requests if r.method == "POST"} == {"env-actor-model"}
    records = read_records(tmp_path / "runs" / "r" / "trials" / "episodes.jsonl")
    assert records and all("env-actor-model" in r.actor_id for r in records)
    written = tmp_path / "runs" / "r" / "trials" / "config.yaml"
    assert read_sources(written)["actor.llm.model"] == ".env OPENAI_MODEL"
    assert "FAKE_KEY" in written.read_text()  # the key is named, never written
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and b"SENTINEL" in p.read_bytes()]


# ----------------------------------------------------------------------------------------------------------------------
# DATA_DIR: environment data below it, unless the specific variable is set


def test_data_dir_supplies_hotpotqa_and_alfworld_data_below_the_specific_variables(tmp_path, monkeypatch):
    from retroformer.cli import trials_env_defaults

    data = tmp_path / "data"
    (data / "hotpotqa").mkdir(parents=True)
    fixture = ROOT / "retroformer" / "envs" / "hotpotqa_data" / "fixture.json"
    shutil.copyfile(fixture, data / "hotpotqa" / "hotpot_dev_distractor_v1.json")
    (data / "alfworld").mkdir()
    monkeypatch.setenv("DATA_DIR", str(data))

    def resolved(env: str, *extra: str):
        cfg, sources = resolve_config(TrialsConfig, ["--env.name", env, *extra], env_defaults=trials_env_defaults)
        fill_env_paths(cfg, sources)
        return cfg.env.options.get("data_path"), sources

    path, sources = resolved("hotpotqa")
    assert path == str(data / "hotpotqa" / "hotpot_dev_distractor_v1.json")
    assert sources["data_dir"] == ".env DATA_DIR" and sources["env.options.data_path"].startswith("data_dir")
    assert resolved("alfworld")[0] == str(data / "alfworld")
    # the more specific variables win over DATA_DIR; the recipe / command line win over both
    monkeypatch.setenv("HOTPOTQA_DATA", str(fixture))
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    assert resolved("hotpotqa") == (str(fixture), {**sources, "env.options.data_path": ".env HOTPOTQA_DATA"})
    assert resolved("alfworld")[0] == str(tmp_path)
    assert resolved("alfworld", "--env.options", f"{{data_path: {tmp_path / 'x'}}}")[0] == str(tmp_path / "x")
    # --data_dir beats DATA_DIR
    other = tmp_path / "other"
    (other / "alfworld").mkdir(parents=True)
    monkeypatch.delenv("ALFWORLD_DATA")
    assert resolved("alfworld", "--data_dir", str(other))[0] == str(other / "alfworld")


# ----------------------------------------------------------------------------------------------------------------------
# The seed's workflow: `python sft_run.py`, `python reward_run.py`, `python ppo_run.py` from .env alone


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_bare_three_command_workflow_from_dot_env(tmp_path, tiny_models):
    work, ckpt, data = tmp_path / "work", tmp_path / "ckpt", tmp_path / "data"
    for d in (work, ckpt, data):
        d.mkdir()
    (work / ".env").write_text(f"CKPT_DIR={ckpt}\nDATA_DIR={data}\nOPENAI_API_KEY=sk-SENTINEL-bare-5c1e\n")

    # Before any data: the script says what is missing (exit code 2, no traceback).
    out = run_script([str(ROOT / "sft_run.py")], work)
    assert out.returncode == 2 and "error: sft_run.py: model not set" in out.stderr, out.stderr[-2000:]
    assert "CKPT_DIR" in out.stderr and "Traceback" not in out.stderr
    (ckpt / "base").symlink_to(tiny_models["lm"], target_is_directory=True)

    # A trials run writes the data (demo collect recipe, fewer tasks); DATA_DIR gets a copy.
    out = run_script(
        ["-m", "retroformer.cli", "trials", "--config", str(ROOT / "experiments/demo/collect.yaml"),
         "--runs_dir", str(tmp_path / "runs"), "--env.options", "{num_tasks: 16, num_doors: 4, seed: 100}"],
        work,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert (data / "rated_reflections" / "dataset_info.json").is_file()

    for script in ("sft_run.py", "reward_run.py"):
        out = run_script([str(ROOT / script)], work)
        assert out.returncode == 0, out.stderr[-3000:]
    # PPO from the SFT adapter and the reward model found below CKPT_DIR; fewer iterations than the default 100.
    out = run_script([str(ROOT / "ppo_run.py"), "--num_iterations", "2", "--batch_size", "2"], work)
    assert out.returncode == 0, out.stderr[-3000:]

    assert (ckpt / "sft" / "adapter_config.json").is_file()
    assert (ckpt / "reward" / "config.json").is_file()
    assert (ckpt / "ppo" / "adapter_config.json").is_file()
    sft_sources = read_sources(ckpt / "sft" / "sft_config.yaml")
    assert sft_sources == {
        "model": ".env CKPT_DIR (base/)",
        "dataset": ".env DATA_DIR (rated_reflections/)",
        "output_dir": ".env CKPT_DIR (sft/)",
    }
    ppo_sources = read_sources(ckpt / "ppo" / "config.yaml")
    assert ppo_sources["sft_adapter"] == ".env CKPT_DIR (sft/)" and ppo_sources["reward_model"].startswith(".env")
    written = [p for d in (ckpt, data, tmp_path / "runs") for p in d.rglob("*") if p.is_file()]
    assert written and not [p for p in written if b"SENTINEL" in p.read_bytes()]  # no secret in any output
    ppo_cfg = yaml.safe_load((ckpt / "ppo" / "config.yaml").read_text())
    assert ppo_cfg["sft_adapter"] == str(ckpt / "sft") and ppo_cfg["reward_model"] == str(ckpt / "reward")
