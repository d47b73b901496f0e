"""A run directory used by one run at a time, runs that survive outages and environment errors, and resumes that
re-attempt errored episodes, fill gaps and refuse configs that change what the records mean.

Everything runs offline: the fake OpenAI-compatible server plays actor and reflector, or the synthetic env's plan
actor plays alone.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import yaml

from retroformer.cli import main as cli_main
from retroformer.config import from_dict
from retroformer.dataset import rated_reflection_rows
from retroformer.envs.base import make_suite
from retroformer.envs.synthetic import SyntheticSuite, VaultEnv
from retroformer.errors import ConfigError, RunInUse
from retroformer.records import RunLock, config_path, effective_records, read_records, records_path
from retroformer.testing import FakeOpenAIServer
from retroformer.testing.vault_policy import vault_reply
from retroformer.trials import TrialsConfig, run_trials


def cfg_for(tmp_path, base_url: str | None = None, **over) -> TrialsConfig:
    """Vault tasks; with ``base_url`` actor and reflector over the fake server, else the plan actor alone."""
    return from_dict(TrialsConfig, cfg_dict(tmp_path, base_url, **over))


def cfg_dict(tmp_path, base_url: str | None = None, **over) -> dict:
    data: dict = {
        "run_name": "r",
        "runs_dir": str(tmp_path / "runs"),
        "trials": 3,
        "concurrency": 1,
        "export_dataset": False,
        "env": {"name": "synthetic", "options": {"num_tasks": 4, "num_doors": 3}},
    }
    if base_url is None:
        data["actor"] = {"kind": "plan"}
        data["reflector"] = {"kind": "none"}
    else:
        llm = {"backend": "openai", "base_url": base_url, "model": "fake-model", "timeout_s": 2, "max_retries": 0}
        data["actor"] = {"kind": "react", "llm": dict(llm)}
        data["reflector"] = {"llm": dict(llm, max_tokens=64)}
    for key, value in over.items():
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return data


def keys(records) -> list[tuple[str, int]]:
    return sorted((r.task_id, r.trial) for r in records)


def assert_complete(records, tasks: int = 4) -> None:
    """Every task: trial 0 failed, trial 1 succeeded (the vault policy), each recorded successfully exactly once."""
    current = effective_records(records)
    assert keys(current) == sorted((f"vault-0-{i:03d}", t) for i in range(tasks) for t in (0, 1))
    assert not any(r.errored for r in current)
    assert [r.success for r in sorted(current, key=lambda r: (r.task_id, r.trial))] == [False, True] * tasks


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    from retroformer.llm import openai_backend

    monkeypatch.setattr(openai_backend.OpenAIBackend, "_backoff", lambda self, retry: 0.01)


# --- 1. one run per directory ---------------------------------------------------------------------------------------


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    cfg = cfg_for(tmp_path, trials=1)
    with RunLock(tmp_path / "runs" / "r"):
        with pytest.raises(RunInUse, match=rf"in use by another run \(pid {os.getpid()} on "):
            run_trials(cfg, progress=False)
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(cfg_dict(tmp_path)))
        assert cli_main(["trials", "--config", str(recipe)]) == 2
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert not records_path(tmp_path / "runs" / "r").exists()  # the refused runs wrote nothing
    assert run_trials(cfg, progress=False).new_episodes == 4  # released: the directory is free again


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    run = tmp_path / "runs" / "r"
    code = (
        "import sys, time\nfrom retroformer.records import RunLock\n"
        f"RunLock({str(run)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUse, match=f"pid {proc.pid}"):
            RunLock(run).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (run / "trials" / "run.lock").exists()  # the file stays; the lock died with its process
    with RunLock(run):
        pass


# --- 2. outages: circuit breaker, then a rerun re-attempts ------------------------------------------------------------


def test_an_actor_outage_stops_the_run_with_exit_3_and_a_rerun_completes_every_episode_once(tmp_path, capsys):
    # the first 3 requests fail (max_retries 0): tasks 0-2 error, then the breaker (3 in a row) stops the run
    server = FakeOpenAIServer(reply=vault_reply, faults=["500"] * 3)
    with server as url:
        cfg = cfg_for(tmp_path, url, max_consecutive_errors=3, outage_wait_s=0)
        res = run_trials(cfg, progress=False)
        assert res.new_episodes == 3 and all(r.end_reason == "llm_error" for r in res.records)
        assert (
            "3 attempts in a row failed" in res.stopped_by_errors
            and "run the same command again" in res.stopped_by_errors
        )
        assert not res.stopped_by_budget
        # the same through the command: exit code 3 and the message on stderr
        recipe = tmp_path / "r.yaml"
        data = yaml.safe_load(config_path(res.run_dir).read_text())
        data["run_name"] = "cli"
        recipe.write_text(yaml.safe_dump(data))
        server.add_faults(["500"] * 3)
        assert cli_main(["trials", "--config", str(recipe)]) == 3
        assert "attempts in a row failed" in capsys.readouterr().err

        again = run_trials(cfg, progress=False)  # the outage is over
    assert again.stopped_by_errors is None
    assert_complete(again.records)
    assert again.summary["errored_episodes"] == 0 and again.summary["replaced_attempts"] == 3
    assert again.summary["num_episodes"] == 8 and again.summary["cumulative_success"] == [0.0, 1.0, 1.0]
    assert len(rated_reflection_rows(again.records)) == 4
    assert run_trials(cfg, progress=False).new_episodes == 0  # and nothing is left to do


def outage_after(server: FakeOpenAIServer, requests: int, seconds: float):
    """The vault's replies, and a total outage (503) of ``seconds`` from the ``requests``-th request on."""
    count = itertools.count(1)

    def reply(prompt: str) -> str:
        if next(count) == requests:
            server.outage(seconds)
        return vault_reply(prompt)

    return reply


@pytest.fixture
def quick_probes(monkeypatch):
    import retroformer.trials as trials

    monkeypatch.setattr(trials, "OUTAGE_PROBE_S", (0.05, 0.4))


def test_an_outage_is_ridden_out_and_every_task_and_trial_recorded_once(tmp_path, quick_probes, caplog):
    caplog.set_level("INFO", logger="retroformer")
    server = FakeOpenAIServer(latency_s=0.01)
    server.state.reply = outage_after(server, requests=6, seconds=2.0)
    with server as url:
        cfg = cfg_for(
            tmp_path, url, max_consecutive_errors=3, concurrency=2, outage_wait_s=60, **{"env.options.num_tasks": 8}
        )
        res = run_trials(cfg, progress=False)
    assert res.stopped_by_errors is None and not res.stopped_by_budget
    assert any(r.errored for r in res.records)  # the outage did hit the run
    assert_complete(res.records, tasks=8)  # each (task, trial) once, the last record of none errored
    assert res.summary["errored_episodes"] == 0 and res.summary["cumulative_success"] == [0.0, 1.0, 1.0]
    assert "pausing new episodes and probing" in caplog.text and "answers again after" in caplog.text
    assert "re-attempting" in caplog.text


def test_an_outage_longer_than_outage_wait_s_stops_the_run_with_exit_3(tmp_path, quick_probes, capsys):
    server = FakeOpenAIServer()
    server.state.reply = outage_after(server, requests=1, seconds=60.0)
    with server as url:
        data = cfg_dict(tmp_path, url, max_consecutive_errors=3, outage_wait_s=0.5)
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(data))
        assert cli_main(["trials", "--config", str(recipe)]) == 3
    err = capsys.readouterr().err
    assert "over 0.5 s of outage (outage_wait_s" in err and "run the same command again" in err


def test_a_reflector_failure_is_written_by_the_rerun_and_the_task_goes_on(tmp_path):
    # request 1: task 0's action; request 2: its reflection, which fails
    with FakeOpenAIServer(reply=vault_reply, faults=[None, "503"]) as url:
        first = run_trials(cfg_for(tmp_path, url), progress=False)
        (rec,) = [r for r in first.records if r.task_id == "vault-0-000"]
        assert rec.reflection is None and rec.error.startswith("reflector:")
        again = run_trials(cfg_for(tmp_path, url), progress=False)
    assert_complete(again.records)
    fixed = [r for r in again.records if r.task_id == "vault-0-000" and r.trial == 0]
    assert len(fixed) == 2 and fixed[1].reflection is not None and fixed[1].steps == rec.steps
    assert fixed[1].actor_usage.calls == 0  # the actor's tokens were counted on the first line
    assert again.summary["cost"]["calls"] == 12  # 3 per task (a failed call answers nothing and costs nothing)


# --- 3. environment errors outside step ------------------------------------------------------------------------------


class FlakyVault(VaultEnv):
    """Fails in ``reset``, ``outcome`` or ``close`` for the tasks named in ``fail``, once each."""

    fail: dict[str, str] = {}

    def reset(self, task):
        if self.fail.get(task.task_id) == "reset":
            del self.fail[task.task_id]
            raise OSError("connection reset by peer")
        self.where = task.task_id
        return super().reset(task)

    def outcome(self):
        if self.fail.pop(self.where, None) == "outcome":
            from retroformer.errors import EnvError

            raise EnvError("outcome: HTTP 502")
        return super().outcome()


@pytest.mark.parametrize("where", ["make", "reset", "outcome"])
def test_an_environment_error_outside_step_errors_one_episode_and_a_rerun_redoes_it(tmp_path, monkeypatch, where):
    from retroformer.errors import EnvError

    made = {"n": 0}

    def make(self):
        made["n"] += 1
        if where == "make" and made["n"] == 2:
            raise EnvError("could not start a session")
        return FlakyVault()

    monkeypatch.setattr(SyntheticSuite, "make", make)
    FlakyVault.fail = {"vault-0-001": where} if where != "make" else {}
    res = run_trials(cfg_for(tmp_path, trials=1), progress=False)
    assert res.new_episodes == 4
    (bad,) = [r for r in res.records if r.errored]
    assert bad.end_reason == "env_error" and bad.task_id == "vault-0-001" and where in bad.error
    again = run_trials(cfg_for(tmp_path, trials=1), progress=False)
    assert again.new_episodes == 1 and not any(r.errored for r in effective_records(again.records))


def test_webshop_with_more_sessions_than_the_builtin_catalog_fails_at_config_time():
    with pytest.raises(ConfigError, match="num_sessions=20.*4 goals"):
        make_suite("webshop", {"num_sessions": 20}).tasks()


# --- 4. a missing middle trial, and a cut multi-byte line --------------------------------------------------------------


def test_a_missing_middle_trial_is_rerun_and_a_cut_multibyte_last_line_is_repaired(tmp_path):
    with FakeOpenAIServer(reply=vault_reply) as url:
        cfg = cfg_for(tmp_path, url, stop_on_success=False)
        first = run_trials(cfg, progress=False)
        assert len(first.records) == 12
        path = records_path(first.run_dir)
        lines = path.read_bytes().splitlines(keepends=True)
        middle = next(i for i, x in enumerate(lines) if json.loads(x)["trial"] == 1)
        gone = json.loads(lines[middle])
        del lines[middle]
        last = lines.pop()  # the last record's write was cut inside a multi-byte character
        marked = last.replace(b'"created_at": "', '"created_at": "é✓'.encode())
        path.write_bytes(b"".join(lines) + marked[: marked.index("✓".encode()) + 1])
        again = run_trials(cfg, progress=False)
        assert again.new_episodes == 2  # the removed middle trial and the cut last line
        assert keys(again.records) == keys(first.records)  # no duplicate, nothing lost
        assert (gone["task_id"], 1) in keys(again.records[-2:])
        assert run_trials(cfg, progress=False).new_episodes == 0


def test_the_corrupt_line_message_tells_the_truth_about_removing_it(tmp_path):
    with FakeOpenAIServer(reply=vault_reply) as url:
        cfg = cfg_for(tmp_path, url, stop_on_success=False)
        run_trials(cfg, progress=False)
        path = records_path(tmp_path / "runs" / "r")
        lines = path.read_text().splitlines(keepends=True)
        lines[1] = "{not json\n"
        path.write_text("".join(lines))
        with pytest.raises(Exception, match="episodes whose lines are removed are re-run"):
            run_trials(cfg, progress=False)
        del lines[1]
        path.write_text("".join(lines))
        assert run_trials(cfg, progress=False).new_episodes == 1
        assert len({(r.task_id, r.trial) for r in read_records(path)}) == 12


# --- 5. resume checks the config before writing it ---------------------------------------------------------------------


def test_resume_with_a_changed_memory_size_is_refused_and_leaves_the_config_alone(tmp_path):
    run_trials(cfg_for(tmp_path, trials=1), progress=False)
    before = config_path(tmp_path / "runs" / "r").read_text()
    with pytest.raises(ConfigError, match=r"memory_size: 3 -> 1"):
        run_trials(cfg_for(tmp_path, trials=1, memory_size=1), progress=False)
    with pytest.raises(ConfigError, match=r"actor.max_prompt_chars: 24000 -> 100"):
        run_trials(cfg_for(tmp_path, trials=1, **{"actor.max_prompt_chars": 100}), progress=False)
    assert config_path(tmp_path / "runs" / "r").read_text() == before
    run_trials(cfg_for(tmp_path, trials=1, concurrency=3), progress=False)  # speed settings may change


def test_resume_with_changed_environment_options_is_refused_naming_them_and_touches_nothing(tmp_path):
    run_trials(cfg_for(tmp_path, trials=2), progress=False)
    run = tmp_path / "runs" / "r"
    config_before, records_before = config_path(run).read_bytes(), records_path(run).read_bytes()
    changed = {"env.options": {"num_tasks": 4, "num_doors": 5, "wall_clue": True}}
    with pytest.raises(ConfigError, match=r"env.options.num_doors: 3 -> 5; env.options.wall_clue: False -> True"):
        run_trials(cfg_for(tmp_path, trials=3, **changed), progress=False)
    assert config_path(run).read_bytes() == config_before
    assert records_path(run).read_bytes() == records_before
    # An option written out at its default is the same task list as the option left out.
    same = {"env.options": {"num_tasks": 4, "num_doors": 3, "wall_clue": False, "seed": 0}}
    run_trials(cfg_for(tmp_path, trials=2, **same), progress=False)


def test_raising_trials_writes_the_missing_reflection_before_the_next_trial(tmp_path):
    with FakeOpenAIServer(reply=vault_reply) as url:
        one = run_trials(cfg_for(tmp_path, url, trials=1), progress=False)
        assert all(r.reflection is None and not r.success for r in one.records)
        three = run_trials(cfg_for(tmp_path, url, trials=3), progress=False)
    assert_complete(three.records)
    for rec in effective_records(three.records):
        if rec.trial == 1:
            assert len(rec.memory) == 1 and "door" in rec.memory[0]  # the reflection written on resume


# --- 10. environment calls are not capped by asyncio's default thread pool --------------------------------------------


def test_environment_calls_run_as_concurrently_as_the_run_allows(tmp_path, monkeypatch):
    cond = threading.Condition()
    state = {"now": 0, "max": 0}

    class SlowVault(VaultEnv):
        def reset(self, task):
            # Each reset waits (up to 5 s) until all 16 are in flight at once: a pool that is too small never gets there.
            with cond:
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
                cond.notify_all()
                cond.wait_for(lambda: state["max"] >= 16, timeout=5)
                state["now"] -= 1
            return super().reset(task)

    monkeypatch.setattr(SyntheticSuite, "make", lambda self: SlowVault())
    monkeypatch.setattr(SyntheticSuite, "blocking", True)  # this reset blocks: worker threads, as for a real env
    cfg = cfg_for(tmp_path, trials=1, concurrency=16, **{"env.options": {"num_tasks": 16}})
    run_trials(cfg, progress=False)
    assert state["max"] == 16  # asyncio's default pool holds min(32, cpus + 4) threads: 6 on two cores


# --- layering ---------------------------------------------------------------------------------------------------------


def own_imports(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its source (module level or inside functions)."""
    import ast
    import importlib.util

    tree = ast.parse(open(importlib.util.find_spec(module).origin, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("retroformer"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("retroformer"))
    return found


def test_the_builders_sit_below_the_episode_runner_and_the_trial_loop():
    assert "retroformer.trials" not in own_imports("retroformer.rollout")
    assert {"retroformer.rollout", "retroformer.trials"}.isdisjoint(own_imports("retroformer.builders"))
    assert "retroformer.builders" in own_imports("retroformer.rollout") & own_imports("retroformer.trials")


# --- low: records, report, run names, inputs, Ctrl-C ------------------------------------------------------------------


def finished_run(tmp_path, **over):
    return run_trials(cfg_for(tmp_path, **{"trials": 1, **over}), progress=False)


def test_a_whole_last_line_without_its_newline_gets_one_before_the_next_append(tmp_path):
    res = finished_run(tmp_path)
    path = records_path(res.run_dir)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    assert len(read_records(path)) == 4 and path.read_bytes().endswith(b"\n")
    # the last episode's line is gone and the one before lost its newline: the rerun appends a line of its own
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-2]) + lines[-2].rstrip(b"\n"))
    again = finished_run(tmp_path)
    assert again.new_episodes == 1 and len(read_records(path, repair=False)) == 4


def test_invalid_utf8_inside_the_records_is_a_data_error_with_file_and_line(tmp_path):
    from retroformer.errors import DataError

    res = finished_run(tmp_path)
    path = records_path(res.run_dir)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"created_at": "', b'"created_at": "\xff\xfe')
    path.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON \(invalid UTF-8"):
        read_records(path)


def test_report_counts_the_tasks_a_stopped_run_never_reached(tmp_path):
    from retroformer.report import load_run

    with FakeOpenAIServer(reply=vault_reply) as url:
        res = run_trials(cfg_for(tmp_path, url, **{"budget.max_tokens": 150}), progress=False)
    assert res.stopped_by_budget and len({r.task_id for r in res.records}) < 4
    _, summary = load_run(res.run_dir)
    assert summary["num_tasks"] == 4 and summary["cumulative_success"][-1] <= 0.5


def test_resuming_records_of_another_run_name_is_refused(tmp_path):
    from retroformer.errors import DataError

    res = finished_run(tmp_path, trials=2)
    res.run_dir.rename(res.run_dir.with_name("renamed"))
    (res.run_dir.with_name("renamed") / "trials" / "config.yaml").unlink()
    with pytest.raises(DataError, match="episodes of run 'r', not 'renamed'.*run_name='r'"):
        run_trials(cfg_for(tmp_path, run_name="renamed", trials=2), progress=False)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"env.max_tasks": -5}, "env.max_tasks must be >= 1"),
        ({"budget.max_usd": -1}, "budget.max_usd must be > 0"),
        ({"budget.max_tokens": 0}, "budget.max_tokens must be >= 1"),
        ({"run_name": " "}, "run_name must be a plain directory name"),
        ({"run_name": "a "}, "run_name must be a plain directory name"),
        (
            {"env.options": {"num_tasks:20": None}},
            r"without a space after the colon; YAML needs one: \{num_tasks: 20\}",
        ),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_them(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        cfg = cfg_for(tmp_path, **over)
        make_suite(cfg.env.name, cfg.env.options)


def test_a_non_utf8_recipe_is_a_config_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes("run_name: caf\u00e9\n".encode("latin-1"))
    assert cli_main(["trials", "--config", str(recipe)]) == 2


def test_ctrl_c_exits_130_with_one_line_and_no_traceback(tmp_path, monkeypatch, capsys):
    import retroformer.cli as cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "trials", interrupted)
    assert cli_main(["trials"]) == 130
    err = capsys.readouterr().err
    assert "run the same command again to resume" in err and "Traceback" not in err


def test_a_report_never_writes_to_the_records_of_a_run(tmp_path):
    from retroformer.report import load_run

    res = finished_run(tmp_path)
    path = records_path(res.run_dir)
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = b"".join(lines[:-1]) + lines[-1][:40]  # a line being written while the report reads
    path.write_bytes(damaged)
    _, summary = load_run(res.run_dir)
    assert summary["num_episodes"] == 3 and path.read_bytes() == damaged
