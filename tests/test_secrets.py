"""API keys reach the server and nothing else; model output is only ever text.

A sentinel key goes in through the environment variable named by ``api_key_env`` (set in the process environment, or
in a ``.env`` file in the working directory, which the CLI loads). The fake server records the ``Authorization``
header, so the tests prove the key was used; then every file under the run directory (records, dataset, config,
cache, report) and every captured log line and stream is searched for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from test_reliability import vault_reply

from retroformer.cli import main
from retroformer.records import read_records
from retroformer.testing import FakeOpenAIServer, Fault

SENTINEL = "sk-SENTINEL-7f3a9c1e5b2d4068a1c3e5f7"
KEY_VAR = "RETRO_TEST_SENTINEL_KEY"


def cli_args(runs: Path, url: str, name: str, cache: bool = True) -> list[str]:
    """``retroformer trials`` with a recipe file: actor and reflector over ``url``, keyed by ``KEY_VAR``."""
    llm = {"backend": "openai", "base_url": url, "model": "fake-model", "api_key_env": KEY_VAR, "max_retries": 1}
    recipe = {
        "run_name": name,
        "runs_dir": str(runs),
        "trials": 3,
        "concurrency": 1,
        "cache_dir": str(runs / "cache") if cache else None,
        "env": {"name": "synthetic", "options": {"num_tasks": 3, "num_doors": 3}},
        "actor": {"kind": "react", "llm": llm},
        "reflector": {"llm": llm},
    }
    path = runs.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return ["trials", "--config", str(path)]


def leaks_in_tree(root: Path) -> list[str]:
    """Files under ``root`` whose bytes contain the sentinel (binary files included: arrow shards, PNGs)."""
    return [str(p) for p in root.rglob("*") if p.is_file() and SENTINEL.encode() in p.read_bytes()]


def assert_key_was_sent(server: FakeOpenAIServer) -> None:
    posts = [r for r in server.requests if r.method == "POST"]
    assert posts, "the server received no request"
    auth = {r.headers.get("Authorization") or r.headers.get("authorization") for r in posts}
    assert auth == {f"Bearer {SENTINEL}"}


# Faults that make the backend log retries (each followed by a good answer), then one that is not retried (401): its
# error message is logged and recorded with the episode.
FAULTS = ["500", None, Fault("429", retry_after="0"), None, "reset", None, "malformed", None, "401"]


def test_key_from_the_environment_is_sent_but_never_written_or_logged(tmp_path, monkeypatch, capsys, caplog):
    from retroformer.llm import openai_backend

    monkeypatch.setattr(openai_backend.OpenAIBackend, "_backoff", lambda self, retry: 0.01)
    monkeypatch.chdir(tmp_path)  # no .env here: the key comes from the process environment
    monkeypatch.setenv(KEY_VAR, SENTINEL)
    monkeypatch.setenv("RETROFORMER_LOG_LEVEL", "DEBUG")
    caplog.set_level("DEBUG")
    runs = tmp_path / "runs"
    server = FakeOpenAIServer(reply=vault_reply, faults=FAULTS)
    with server as url:
        assert main(cli_args(runs, url, "env-key")) == 0
        assert main(["report", str(runs / "env-key"), "--out", str(runs / "env-key" / "report")]) == 0
    assert_key_was_sent(server)
    recs = read_records(runs / "env-key" / "trials" / "episodes.jsonl")
    errors = [r.error for r in recs if r.error]
    assert errors and any("401" in e for e in errors), "a fault should have been recorded as an error"
    assert "retrying" in caplog.text  # retries were logged
    out = capsys.readouterr()
    assert SENTINEL not in out.out and SENTINEL not in out.err
    assert SENTINEL not in caplog.text
    for record in caplog.records:  # the arguments of a log call, not only the rendered text
        assert SENTINEL not in repr(record.args) and SENTINEL not in str(record.msg)
    assert (runs / "env-key" / "trials" / "config.yaml").is_file() and list((runs / "cache").rglob("*.json"))
    assert leaks_in_tree(tmp_path) == []


def test_key_from_a_dot_env_file_is_sent_but_never_written_or_logged(tmp_path):
    (tmp_path / ".env").write_text(f"{KEY_VAR}={SENTINEL}\n")
    env = {k: v for k, v in os.environ.items() if k != KEY_VAR}
    env["RETROFORMER_LOG_LEVEL"] = "DEBUG"
    runs = tmp_path / "runs"
    server = FakeOpenAIServer(reply=vault_reply, faults=FAULTS)
    with server as url:
        proc = subprocess.run(
            [sys.executable, "-m", "retroformer.cli", *cli_args(runs, url, "dotenv-key")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_key_was_sent(server)
    assert "attempt 1/2 failed" in proc.stderr  # the faults were logged
    assert SENTINEL not in proc.stdout and SENTINEL not in proc.stderr
    # the .env file itself holds the key, by design; nothing else may
    assert leaks_in_tree(tmp_path) == [str(tmp_path / ".env")]


# --- model output is only ever text -------------------------------------------------------------------------------

HOSTILE_REFLECTION = "../../etc/passwd $(touch PWNED_BY_REFLECTION) `rm -rf /` ; cat ~/.ssh/id_rsa > /tmp/x"
HOSTILE_ACTION = "open[../../etc/passwd]; $(touch PWNED_BY_ACTION)"


def hostile_reply(prompt: str) -> str:
    if prompt.rstrip().endswith("Reflection:"):
        return HOSTILE_REFLECTION
    return f"Thought: ../../{{run_name}} $(id)\nAction: {HOSTILE_ACTION}"


def test_path_and_shell_like_model_output_is_stored_verbatim_and_never_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    with FakeOpenAIServer(reply=hostile_reply) as url:
        assert main(cli_args(runs, url, "hostile", cache=False)) == 0
    run = runs / "hostile"
    recs = read_records(run / "trials" / "episodes.jsonl")
    assert len(recs) == 9 and all(r.run_name == "hostile" for r in recs)
    for rec in recs:
        assert rec.steps[0].action == HOSTILE_ACTION and not rec.steps[0].valid  # an invalid action, as text
        assert rec.steps[0].thought == "../../{run_name} $(id)"
        if rec.trial < 2:
            assert rec.reflection.text == HOSTILE_REFLECTION
    assert [r.memory for r in recs if r.trial == 2][0] == [HOSTILE_REFLECTION] * 2
    from datasets import load_from_disk

    ds = load_from_disk(str(run / "datasets" / "rated_reflections"))
    assert set(ds["reflection"]) == {HOSTILE_REFLECTION}
    # nothing was executed or written outside the run directory, and the run's layout is the usual one
    assert not list(tmp_path.rglob("PWNED*")) and not Path("/tmp/x").exists() or _x_is_old()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.yaml", "runs"]
    assert sorted(p.name for p in runs.iterdir()) == ["hostile"]
    assert sorted(p.name for p in run.iterdir()) == ["datasets", "trials"]
    line = (run / "trials" / "episodes.jsonl").read_text().splitlines()[0]
    assert json.loads(line)["steps"][0]["action"] == HOSTILE_ACTION


def _x_is_old() -> bool:
    """/tmp/x may exist from something else on this machine; it must not be ours (older than this test)."""
    import time

    return time.time() - Path("/tmp/x").stat().st_mtime > 600
