"""Bad values fail before any call, with one line that says what was wrong and how to fix it: timeouts, URLs,
credentials, integers out of range, an empty recipe, a data file that is not UTF-8, a stage given something that is
not a dataset, nested overrides on the command line, and a help text of real commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from retroformer import cli
from retroformer.cli import main as cli_main
from retroformer.config import from_dict, resolve_config
from retroformer.errors import ConfigError, DataError
from retroformer.llm import LLMConfig
from retroformer.llm.openai_backend import _retry_after_s
from retroformer.training.common import check_dataset_paths
from retroformer.trials import TrialsConfig

SECRET = "pw-SECRET-4711"


@pytest.fixture(autouse=True)
def _clean_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .env of the checkout, nothing written beside the tests
    for name in ("DATA_DIR", "CKPT_DIR", "HOTPOTQA_DATA", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)


def recipe(tmp_path: Path, text: str | dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(text))
    return str(path)


def trials(tmp_path, capsys, data: dict, *flags: str) -> tuple[int, str]:
    base = {"run_name": "v", "runs_dir": str(tmp_path / "runs"), "export_dataset": False}
    code = cli_main(["trials", "--config", recipe(tmp_path, {**base, **data}), *flags])
    return code, capsys.readouterr().err


def served(**llm) -> dict:
    section = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", **llm}
    return {"actor": {"kind": "react", "llm": section}, "reflector": {"kind": "none"}}


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_a_non_finite_timeout_is_refused(tmp_path, capsys, value):
    code, err = trials(tmp_path, capsys, yaml.safe_load(f"actor: {{llm: {{timeout_s: {value}}}}}"))
    assert code == 2 and "actor.llm.timeout_s" in err and "finite" in err
    with pytest.raises(ConfigError, match="finite"):
        LLMConfig(timeout_s=float("inf"))


@pytest.mark.parametrize("url", ["127.0.0.1:8000/v1", "localhost:8000/v1", "ftp://host/v1", "http:///v1"])
def test_a_base_url_without_a_scheme_or_host_is_refused(url):
    with pytest.raises(ConfigError, match="needs a scheme and a host"):
        LLMConfig(backend="openai", base_url=url)


def test_credentials_in_a_base_url_are_refused_and_written_nowhere(tmp_path, capsys, caplog):
    url = f"http://user:{SECRET}@127.0.0.1:9/v1"
    code, err = trials(tmp_path, capsys, served(base_url=url, api_key_env="MY_KEY"), "--report_to", "tensorboard")
    assert code == 2
    assert "credentials do not belong in a URL" in err and "llm.api_key_env" in err and "MY_KEY" in err
    assert SECRET not in err and SECRET not in caplog.text
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "recipe.yaml"]
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]
    assert not (tmp_path / "runs" / "v" / "config.yaml").exists()


def test_non_finite_retry_after_headers_are_ignored():
    for value in ("nan", "inf", "-inf"):
        assert _retry_after_s({"retry-after": value}) is None
        assert _retry_after_s({"retry-after-ms": value}) is None


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--trials", "99999999999999999999"], "trials: got 99999999999999999999, which is out of range"),
        (["--trials", "5000"], r"trials must be in 1..1000"),
        (["--concurrency", "-3"], "concurrency must be >= 1"),
    ],
)
def test_integers_out_of_range_fail_fast_with_a_clear_message(tmp_path, capsys, flags, said):
    code, err = trials(tmp_path, capsys, {"actor": {"kind": "plan"}, "reflector": {"kind": "none"}}, *flags)
    assert code == 2 and re.search(said, err), err
    assert not (tmp_path / "runs").exists()


def test_an_empty_recipe_says_it_is_empty(tmp_path, capsys):
    for text in ("", "# only a comment\n"):
        assert cli_main(["trials", "--config", recipe(tmp_path, text)]) == 2
        err = capsys.readouterr().err
        assert "is empty (it sets no fields)" in err and "model" not in err


def test_a_hotpotqa_file_that_is_not_utf8_is_one_error_line_naming_it(tmp_path, capsys):
    data = tmp_path / "hotpot.json"
    data.write_bytes(b'[{"question": "caf\xe9?"}]')
    env = {"env": {"name": "hotpotqa", "options": {"data_path": str(data)}}}
    code, err = trials(
        tmp_path,
        capsys,
        {
            **env,
            "actor": {"kind": "react", "llm": {"backend": "scripted", "scripted_replies": ["x"]}},
            "reflector": {"kind": "none"},
        },
    )
    assert code == 2
    assert err.count("\n") == 1 and str(data) in err and "not UTF-8" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "make, got",
    [
        (lambda d: d / "ratings.jsonl", "is a file (.jsonl), not a dataset directory"),
        (lambda d: d, "is a directory but not a saved Hugging Face dataset"),
        (lambda d: d / "missing", "does not exist"),
    ],
)
def test_a_stage_given_something_that_is_not_a_dataset_says_what_it_got_and_how_to_make_one(tmp_path, make, got):
    (tmp_path / "ratings.jsonl").write_text('{"prompt": "p", "reflection": "r", "rating": 1.0}\n')
    with pytest.raises(DataError, match=re.escape(got)) as info:
        check_dataset_paths(str(make(tmp_path)))
    assert "retroformer import-ratings FILE --out DIR" in str(info.value)
    assert "datasets/rated_reflections" in str(info.value)


def test_nested_dotted_overrides_set_keys_inside_a_mapping(tmp_path):
    path = recipe(tmp_path, {"env": {"name": "synthetic", "options": {"num_tasks": 4, "num_doors": 3}}})
    argv = [
        "--config",
        path,
        "--env.options.num_doors",
        "5",
        "--env.options.wall_clue=true",
        "--env.options.seed",
        "x7",
    ]
    cfg, _ = resolve_config(TrialsConfig, argv)
    assert cfg.env.options == {"num_tasks": 4, "num_doors": 5, "wall_clue": True, "seed": "x7"}
    with pytest.raises(ConfigError, match=r"unknown option '--actor.kind.x'"):
        resolve_config(TrialsConfig, ["--actor.kind.x", "1"])
    with pytest.raises(ConfigError, match=r"--env.options.num_doors needs a value"):
        resolve_config(TrialsConfig, ["--env.options.num_doors"])
    # What the documents show for HotPotQA parses as the CLI takes it.
    cfg, _ = resolve_config(TrialsConfig, ["--env.name", "hotpotqa", "--env.options.data_path", "/d/hotpot.json"])
    assert cfg.env.options == {"data_path": "/d/hotpot.json"}


def test_help_names_only_real_commands_and_recipes(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    commands = set(cli.COMMANDS) | set(cli.EXTERNAL)
    for used in re.findall(r"retroformer ([a-z][\w-]*)", out):
        assert used in commands or used == "COMMAND", used
    root = Path(cli.__file__).resolve().parents[1]
    for path in re.findall(r"(experiments/\S+\.yaml)", out):
        assert (root / path).is_file(), path
    assert "This module" not in out and "``" not in out


def test_every_documented_trials_override_parses(tmp_path):
    """Each `--section.field value` written after `retroformer trials` in an experiment's README parses (a document
    that shows a form the CLI rejects misleads the reader)."""
    root = Path(cli.__file__).resolve().parents[1]
    for readme in sorted((root / "experiments").glob("*/README.md")):
        for line in readme.read_text().splitlines():
            if "retroformer trials" not in line:
                continue
            flags = re.findall(r"(--[a-z_][\w.]*)(?:[ =](?!--)(\S+))?", line.split("retroformer trials", 1)[1])
            argv = [x for flag, value in flags if flag not in ("--config", "--shard") for x in (flag, value or "1")]
            try:
                resolve_config(TrialsConfig, argv)
            except ConfigError as exc:
                assert "unknown option" not in str(exc), f"{readme.name}: {line}: {exc}"
    assert from_dict  # the same parser the recipes go through
