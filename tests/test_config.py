from __future__ import annotations

import pytest

from retroformer.config import from_dict, load_config, make_parser
from retroformer.errors import ConfigError
from retroformer.trials import TrialsConfig


def test_defaults_and_yaml_and_cli_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run_name: a\ntrials: 5\nenv:\n  name: synthetic\n  options: {num_tasks: 4}\n")
    cfg = load_config(TrialsConfig, ["--config", str(recipe), "--trials", "2", "--reflector.llm.temperature", "0.7"])
    assert cfg.run_name == "a"
    assert cfg.trials == 2  # CLI beats YAML
    assert cfg.env.options == {"num_tasks": 4}
    assert cfg.reflector.llm.temperature == 0.7
    assert cfg.memory_size == 3  # default


def test_unknown_yaml_key_is_rejected_with_suggestion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trails: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trails'.*Did you mean 'trials'"):
        load_config(TrialsConfig, ["--config", str(recipe)])


def test_unknown_nested_key_names_its_section():
    with pytest.raises(ConfigError, match=r"reflector\.llm\.'tempreature'|reflector.llm.*tempreature"):
        from_dict(TrialsConfig, {"reflector": {"llm": {"tempreature": 0.1}}})


def test_unknown_cli_flag_is_rejected():
    with pytest.raises(ConfigError, match=r"unknown option '--trails'.*trials"):
        load_config(TrialsConfig, ["--trails", "3"])


def test_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError, match=r"trials: got 'many', expected a value of type int"):
        load_config(TrialsConfig, ["--trials", "many"])


def test_invalid_value_fails_in_post_init():
    with pytest.raises(
        ConfigError, match=r"trials must be in 1..1000 \(the paper uses at most 15 attempts per task\), got 0"
    ):
        load_config(TrialsConfig, ["--trials", "0"])
    with pytest.raises(ConfigError, match=r"llm.concurrency must be >= 1"):
        load_config(TrialsConfig, ["--actor.llm.concurrency", "0"])


def test_literal_field_lists_choices():
    with pytest.raises(ConfigError, match=r"expected one of \['llm', 'none'\]"):
        load_config(TrialsConfig, ["--reflector.kind", "gpt"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrialsConfig, ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrialsConfig, ["--config", str(bad)])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(TrialsConfig, ["--config", str(listy)])


def test_help_documents_every_leaf_field():
    text = make_parser(TrialsConfig).format_help()
    for flag in (
        "--trials",
        "--memory_size",
        "--env.options",
        "--actor.llm.base_url",
        "--reflector.llm.adapter",
        "--budget.max_usd",
    ):
        assert flag in text
    assert "last m reflections" in text


def test_plan_actor_requires_synthetic_env():
    with pytest.raises(ConfigError, match="actor.kind=plan works only with env.name=synthetic"):
        from_dict(TrialsConfig, {"actor": {"kind": "plan"}, "env": {"name": "hotpotqa"}})


def test_option_prefixes_are_not_abbreviations():
    with pytest.raises(ConfigError, match="unknown option '--memory'"):
        load_config(TrialsConfig, ["--memory", "2"])
