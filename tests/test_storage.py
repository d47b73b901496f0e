"""Records that cannot be saved (a full disk): the run stops starting episodes, fails with a clear error, leaves no
partial record in its file, and a rerun resumes with every (task, trial) exactly once."""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest
from test_run_safety import cfg_for

from retroformer.config import from_dict
from retroformer.errors import StorageError
from retroformer.records import RecordWriter, iter_entries, read_records
from retroformer.testing import FakeOpenAIServer
from retroformer.testing.vault_policy import vault_reply
from retroformer.trials import TrialsConfig, records_path, run_trials

SCRIPTED = """\
run_name: full
runs_dir: {runs}
trials: 2
concurrency: 4
export_dataset: false
env: {{name: synthetic, options: {{num_tasks: 60, num_doors: 4}}}}
actor: {{kind: react, llm: {{backend: scripted, scripted_replies: [" I try.\\nAction: open[red]"]}}}}
reflector: {{llm: {{backend: scripted, scripted_replies: ["Open the blue door next time."]}}}}
"""

# The child process may not let any file grow past LIMIT bytes (RLIMIT_FSIZE): the write that crosses it is cut short
# by the kernel and the next one fails with EFBIG, as on a disk that fills up mid-write.
CHILD = """\
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from retroformer.cli import main
sys.exit(main(["trials", "--config", {config!r}]))
"""
LIMIT = 150_000  # the 60 first attempts (about 2.3 KB each, with their reflection) fit, the second attempts do not


def pairs(path) -> collections.Counter:
    return collections.Counter((e.task_id, e.trial) for e in iter_entries(path))


def test_a_file_size_limit_mid_run_fails_clearly_keeps_whole_records_and_a_rerun_completes(tmp_path):
    config = tmp_path / "full.yaml"
    config.write_text(SCRIPTED.format(runs=tmp_path / "runs"))
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(limit=LIMIT, config=str(config))], capture_output=True, text=True
    )
    assert child.returncode == 2, child.stderr[-2000:]
    assert "Traceback" not in child.stderr
    assert "could not save" in child.stderr and "File too large" in child.stderr
    assert "run the same command again to resume" in child.stderr
    path = tmp_path / "runs" / "full" / "trials" / "episodes.jsonl"
    data = path.read_bytes()
    # The write that crossed the limit was undone: whole lines only, nothing past the limit.
    assert 0 < len(data) <= LIMIT and data.endswith(b"\n")
    kept = pairs(path)
    assert kept and max(kept.values()) == 1

    rerun = subprocess.run(
        [sys.executable, "-m", "retroformer.cli", "trials", "--config", str(config)], capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "partial last line" not in rerun.stderr
    done = pairs(path)
    assert len(done) == 60 * 2  # every task failed both trials (the actor always opens red)
    assert max(done.values()) == 1
    assert all(done[p] == 1 for p in kept)  # what the first run saved was not run again


def test_a_failed_write_is_cut_back_and_the_writer_goes_on_after_space_is_freed(tmp_path, monkeypatch):
    from retroformer.types import EpisodeRecord

    def rec(i: int) -> EpisodeRecord:
        return EpisodeRecord(
            run_name="r", task_id=f"t{i}", trial=0, env_name="synthetic", env_version="1", seed=0, actor_id="a",
            reflector_id="none", actor_prompt_hash="h", memory=[], steps=[], return_=0.0, success=False,
            end_reason="done",
        )  # fmt: skip

    path = tmp_path / "records.jsonl"
    writer = RecordWriter(path)
    writer.append_many([rec(0), rec(1)])
    before = path.read_bytes()

    import retroformer.records as records

    real_write = records.os.write
    calls = []

    def full_disk(fd, data):
        if fd != writer._fd:
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # half of the group lands, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records.os, "write", full_disk)
    with pytest.raises(StorageError) as err:
        writer.append_many([rec(2), rec(3)])
    assert len(calls) == 2
    message = str(err.value)
    assert str(path) in message and "No space left on device" in message and "resume" in message
    assert path.read_bytes() == before  # the half-written group is gone
    monkeypatch.setattr(records.os, "write", real_write)
    writer.append_many([rec(4)])
    writer.close()
    assert [r.task_id for r in read_records(path, repair=False)] == ["t0", "t1", "t4"]
    with pytest.raises(StorageError, match="closed"):
        writer.append_many([rec(5)])


def test_once_records_cannot_be_saved_no_more_episodes_start(tmp_path, monkeypatch):
    # Paid calls whose records cannot be kept are lost: after the first failed save only the episodes already in
    # flight may end. Here every save after the first group fails.
    import retroformer.trials as trials

    groups: list[int] = []
    starts: list[bool] = []  # per episode started: whether a save had failed before it started
    real_append, real_episode = RecordWriter.append_many, trials.run_new_episode

    def append_many(self, records):
        groups.append(len(records))
        if len(groups) > 1:
            raise StorageError("could not save: No space left on device (test)")
        real_append(self, records)

    async def run_new_episode(*args, **kwargs):
        starts.append(len(groups) > 1)
        return await real_episode(*args, **kwargs)

    monkeypatch.setattr(RecordWriter, "append_many", append_many)
    monkeypatch.setattr(trials, "run_new_episode", run_new_episode)
    fake = FakeOpenAIServer(reply=vault_reply, latency_s=0.02)
    with fake as url:
        cfg = cfg_for(tmp_path, url, concurrency=2, **{"env.options.num_tasks": 40})
        with pytest.raises(StorageError, match="No space left"):
            run_trials(cfg, progress=False)
    saved = list(read_records(records_path(tmp_path / "runs" / "r")))
    assert len(saved) == groups[0] >= 1
    # The whole run is 80 episodes. Once a save has failed, at most the 2 slots' next episodes may still start (those
    # that started while the failure was on its way to the event loop), not the rest of the run.
    assert len(starts) < 40
    assert sum(starts) <= 2 * cfg.concurrency, starts


def test_the_cli_turns_a_full_disk_into_an_error_line_and_leaves_other_os_errors_alone(monkeypatch, capsys):
    import errno

    from retroformer import cli

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/report.png")

    def missing(argv):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "runs/x")

    monkeypatch.setitem(cli.COMMANDS, "full", full)
    monkeypatch.setitem(cli.COMMANDS, "missing", missing)
    assert cli.main(["full"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device writing runs/x/report.png" in err and "run the same command again" in err
    with pytest.raises(FileNotFoundError):
        cli.main(["missing"])
    assert cli.run_stage_script(full) == 2
    assert "No space left on device" in capsys.readouterr().err


def calls_recorded(path) -> int:
    """LLM calls accounted for in a records file (actor calls of each line plus its reflection's), history included."""
    return sum(
        r.actor_usage.calls + (r.reflection.usage.calls if r.reflection is not None else 0)
        for r in read_records(path, repair=False)
    )


@pytest.mark.parametrize("signame, said", [("SIGTERM", "SIGTERM"), ("SIGINT", "Ctrl-C")])
def test_a_signal_finishes_the_episodes_in_flight_and_a_rerun_pays_for_no_call_twice(tmp_path, signame, said):
    # A cluster's preemption or time limit sends SIGTERM, a person presses Ctrl-C: the calls in flight are paid for,
    # so their episodes finish and are saved; no new one starts. Every call the server answered ends up in a record.
    import signal
    import time

    sig = signal.Signals[signame]

    fake = FakeOpenAIServer(reply=vault_reply, latency_s=0.25)
    with fake as url:
        llm = f"{{backend: openai, base_url: '{url}', model: fake-model, style: chat}}"
        config = tmp_path / "run.yaml"
        config.write_text(
            f"run_name: r\nruns_dir: {tmp_path / 'runs'}\ntrials: 3\nconcurrency: 4\n"
            "env: {name: synthetic, options: {num_tasks: 40, num_doors: 3}}\n"
            f"actor: {{kind: react, llm: {llm}}}\nreflector: {{llm: {llm}}}\n"
        )
        cmd = [sys.executable, "-m", "retroformer.cli", "trials", "--config", str(config)]
        path = tmp_path / "runs" / "r" / "trials" / "episodes.jsonl"
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (path.is_file() and path.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # episodes are in flight now
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        first_calls = len(fake.requests)
        assert proc.returncode == 128 + sig, err[-2000:]
        assert "Traceback" not in err and f"stopped by {said}" in err and "run the same command again" in err
        assert 0 < calls_recorded(path) == first_calls  # no answered call was lost
        assert len(pairs(path)) < 40 * 2  # the run did stop early

        rerun = subprocess.run(cmd, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
    done = pairs(path)
    assert len(done) == 40 * 2 and max(done.values()) == 1  # fail at trial 0, reflect, succeed at trial 1
    assert calls_recorded(path) == len(fake.requests) == 40 * 3


def test_a_run_gives_back_the_signal_handlers_it_found(tmp_path):
    import signal

    def mine(signum, frame):
        pass

    def my_int(signum, frame):
        pass

    cfg = from_dict(TrialsConfig, {
        "run_name": "r", "runs_dir": str(tmp_path / "runs"), "trials": 1, "export_dataset": False,
        "env": {"name": "synthetic", "options": {"num_tasks": 2, "num_doors": 3}}, "actor": {"kind": "plan"},
        "reflector": {"llm": {"backend": "scripted", "scripted_policy": "synthetic-clue"}},
    })  # fmt: skip
    previous = signal.signal(signal.SIGTERM, mine), signal.signal(signal.SIGINT, my_int)
    try:
        run_trials(cfg, progress=False)
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is my_int
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
