"""Shards of one run (``--shard I/N``): a stable split of the tasks, one records file and lock per shard, resume per
shard, a merged dataset and report that hold every task once; and readers that stream the records.

Everything runs offline on the synthetic vault: the plan actor and the scripted clue reflector, which writes the same
reflection for the same prompt, so a run in shards records what the same run in one process records.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import tracemalloc
from collections import Counter

import pytest
import yaml
from datasets import load_from_disk

from retroformer.cli import main as cli_main
from retroformer.config import from_dict
from retroformer.dataset import iter_rated_reflection_rows, rated_reflection_rows, save_rows_in_shards
from retroformer.errors import ConfigError, DataError, RunInUse
from retroformer.records import (
    RecordEntry,
    RunLock,
    index_records,
    iter_entries,
    iter_records,
    iter_records_at,
    iter_run_records,
    parse_shard,
    read_records,
    record_files,
    records_path,
    shard_files,
    shard_of,
    summary_path,
)
from retroformer.report import load_run, summarize_files
from retroformer.trials import TrialsConfig, dataset_path, run_trials
from retroformer.types import RATED_REFLECTION_COLUMNS, EpisodeRecord, Reflection, Step


def cfg_dict(tmp_path, run_name: str = "s", tasks: int = 40, shard: str | None = None, **over) -> dict:
    data: dict = {
        "run_name": run_name,
        "runs_dir": str(tmp_path / "runs"),
        "trials": 3,
        "concurrency": 8,
        "shard": shard,
        "env": {"name": "synthetic", "options": {"num_tasks": tasks, "num_doors": 3}},
        "actor": {"kind": "plan"},
        "reflector": {
            "llm": {"backend": "scripted", "scripted_policy": "synthetic-clue", "scripted_options": {"carry_prob": 0.5}}
        },
    }
    data.update(over)
    return data


def cfg_for(tmp_path, **kwargs) -> TrialsConfig:
    return from_dict(TrialsConfig, cfg_dict(tmp_path, **kwargs))


def run_shards_together(tmp_path, count: int, **kwargs) -> list:
    """All shards of a run started at once, one thread each (each its own event loop and locks, as processes)."""
    results: list = [None] * count
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def one(i: int) -> None:
        try:
            start.wait()
            results[i] = run_trials(cfg_for(tmp_path, shard=f"{i}/{count}", **kwargs), progress=False)
        except BaseException as exc:  # re-raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return results


def assert_each_task_once(records, num_tasks: int, trials: int = 3) -> None:
    """Every (task, trial) recorded once, each task's trials contiguous from 0, ending in success or the last trial."""
    keys = Counter((r.task_id, r.trial) for r in records)
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1][:5]
    by_task: dict[str, list] = {}
    for r in records:
        by_task.setdefault(r.task_id, []).append(r)
    assert len(by_task) == num_tasks
    for recs in by_task.values():
        recs.sort(key=lambda r: r.trial)
        assert [r.trial for r in recs] == list(range(len(recs)))
        assert recs[-1].success or recs[-1].trial == trials - 1
        assert not any(r.errored for r in recs)


def dataset_rows(run) -> list[dict]:
    """The rows of a run's rated-reflection dataset, without the run's name (so that two runs compare)."""
    rows = [{k: v for k, v in r.items() if k != "run_name"} for r in load_from_disk(str(dataset_path(run))).to_list()]
    return sorted(rows, key=lambda r: (r["task_id"], r["trial"]))


# --- the split ---------------------------------------------------------------------------------------------------------


def test_shard_assignment_is_stable_and_partitions_the_tasks():
    ids = [f"vault-0-{i:03d}" for i in range(400)]
    shards = [[t for t in ids if shard_of(t, 4) == i] for i in range(4)]
    assert sorted(t for s in shards for t in s) == sorted(ids)  # every task in exactly one shard
    assert all(70 <= len(s) <= 130 for s in shards), [len(s) for s in shards]  # and the shards are about even
    # sha256 of the id, not Python's salted hash(): the same in every process and on every machine
    expected = int.from_bytes(hashlib.sha256(b"vault-0-007").digest()[:8], "big") % 4
    assert shard_of("vault-0-007", 4) == expected
    code = "from retroformer.records import shard_of; print([shard_of(f'vault-0-{i:03d}', 4) for i in range(400)])"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": "123"}, check=True
    )
    assert json.loads(other.stdout) == [shard_of(t, 4) for t in ids]
    assert all(shard_of(t, 1) == 0 for t in ids)


@pytest.mark.parametrize("value", ["4/4", "-1/4", "0/0", "3", "a/b", "1/4/2", ""])
def test_a_bad_shard_value_is_refused_naming_the_field_the_value_and_the_fix(tmp_path, value):
    with pytest.raises(ConfigError, match=r"shard must be 'I/N' with 0 <= I < N .*got .*e\.g\. --shard 0/4"):
        cfg_for(tmp_path, shard=value)
    assert parse_shard(" 2 / 4 ") == (2, 4)


def test_a_bad_shard_on_the_command_line_exits_2_with_the_message(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(cfg_dict(tmp_path)))
    assert cli_main(["trials", "--config", str(recipe), "--shard", "4/4"]) == 2
    err = capsys.readouterr().err
    assert "shard must be 'I/N'" in err and "'4/4'" in err
    assert not (tmp_path / "runs" / "s").exists()


# --- four shards of 400 tasks ------------------------------------------------------------------------------------------


def test_four_shards_started_together_record_every_task_once_and_merge_like_one_process(tmp_path, capsys):
    results = run_shards_together(tmp_path, 4, tasks=400)
    run = results[0].run_dir
    files = shard_files(run)
    assert sorted(files) == [(i, 4) for i in range(4)] and not records_path(run).exists()
    for (i, n), path in files.items():  # each shard wrote its own tasks only, to its own file
        assert {shard_of(r.task_id, n) for r in iter_records(path)} == {i}
    everything = list(iter_run_records(run))
    assert sum(r.new_episodes for r in results) == len(everything)
    assert_each_task_once(everything, 400)
    assert sum(r.summary["num_tasks"] for r in results) == 400

    # the shard that finished last merged the run, once: the same dataset and summary as one process records
    merged = [r for r in results if r.merged is not None]
    assert len(merged) == 1 and merged[0].dataset_path == dataset_path(run)
    assert merged[0].merged.remaining_tasks == 0
    whole = run_trials(cfg_for(tmp_path, run_name="whole", tasks=400), progress=False)
    assert dataset_rows(run) == dataset_rows(whole.run_dir)
    assert {r["task_id"] for r in dataset_rows(run)} == {f"vault-0-{i:03d}" for i in range(400)}
    summary = json.loads(summary_path(run).read_text())
    for key in ("num_tasks", "num_episodes", "cumulative_success", "per_attempt_success", "mean_rating"):
        assert summary[key] == whole.summary[key], key
    assert summary["num_tasks"] == 400 and summary["remaining_tasks"] == 0

    # the report and the merge command see every task once
    assert cli_main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())["runs"]["s"]
    assert report["num_tasks"] == 400 and report["num_episodes"] == len(everything)
    assert report["cumulative_success"] == whole.summary["cumulative_success"]
    capsys.readouterr()
    assert cli_main(["merge", str(run)]) == 0
    out = capsys.readouterr().out
    assert "s: 400 tasks" in out and "merged 4 records files" in out and "warning" not in out
    assert dataset_rows(run) == dataset_rows(whole.run_dir)


def test_shards_as_processes_started_together_fill_one_run(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(cfg_dict(tmp_path)))
    code = "import sys; from retroformer.cli import main; sys.exit(main(sys.argv[1:]))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, "trials", "--config", str(recipe), "--shard", f"{i}/2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert sum("this shard finished the run last" in out for out, _ in outs) == 1
    run = tmp_path / "runs" / "s"
    assert_each_task_once(list(iter_run_records(run)), 40)
    assert {r["task_id"] for r in dataset_rows(run)} == {f"vault-0-{i:03d}" for i in range(40)}


# --- resume per shard --------------------------------------------------------------------------------------------------


def test_a_killed_shard_resumes_alone_and_then_merges_the_run(tmp_path, capsys):
    run_shards_together(tmp_path, 4)
    run = tmp_path / "runs" / "s"
    expected = dataset_rows(run)
    path = records_path(run, (2, 4))
    lines = path.read_bytes().splitlines(keepends=True)
    # killed: its last three episodes never written, the one before cut mid-write
    path.write_bytes(b"".join(lines[:-4]) + lines[-4][:50])
    summary_path(run).unlink()
    others = {p: p.read_bytes() for p in record_files(run) if p != path}

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(cfg_dict(tmp_path)))
    assert cli_main(["trials", "--config", str(recipe), "--shard", "2/4"]) == 0
    out = capsys.readouterr().out
    assert "(4 new episodes" in out and "this shard finished the run last" in out
    assert all(p.read_bytes() == data for p, data in others.items())  # the other shards' files untouched
    assert_each_task_once(list(iter_run_records(run)), 40)
    assert dataset_rows(run) == expected
    assert run_trials(cfg_for(tmp_path, shard="2/4"), progress=False).new_episodes == 0


def test_a_shard_not_yet_run_leaves_the_merge_to_the_last_one_and_merge_warns(tmp_path, capsys):
    for i in (0, 1):
        assert run_trials(cfg_for(tmp_path, shard=f"{i}/3"), progress=False).merged is None
    run = tmp_path / "runs" / "s"
    assert not dataset_path(run).exists()
    assert cli_main(["merge", str(run)]) == 0  # by hand: what is recorded, with a warning
    out = capsys.readouterr().out
    assert "warning:" in out and "tasks still have work left" in out
    assert load_run(run)[1]["num_tasks"] == 40  # the report counts the tasks of the missing shard as unsolved
    last = run_trials(cfg_for(tmp_path, shard="2/3"), progress=False)
    assert last.merged is not None and last.merged.remaining_tasks == 0


def test_a_run_started_in_one_process_goes_on_in_shards(tmp_path):
    # one trial in one process (no reflection after the last trial), then two trials in two shards: each shard reads
    # its tasks' lines of the unsharded file and writes the missing reflection from the line read back from there
    run_trials(cfg_for(tmp_path, trials=1, **{"reflector": cfg_dict(tmp_path)["reflector"]}), progress=False)
    results = run_shards_together(tmp_path, 2, trials=2)
    run = results[0].run_dir
    assert len(record_files(run)) == 3
    _, summary = load_run(run)
    assert summary["num_tasks"] == 40 and summary["num_episodes"] == 80 and summary["replaced_attempts"] == 40
    assert summary["cumulative_success"][0] == 0.0
    assert sum(r.summary["num_tasks"] for r in results) == 40
    (merged,) = [r.merged for r in results if r.merged is not None]
    assert len(dataset_rows(run)) == 40 == merged.summary["num_rated_reflections"]


# --- locks and layouts ------------------------------------------------------------------------------------------------


def test_two_processes_on_the_same_shard_are_refused_by_the_lock(tmp_path):
    run = tmp_path / "runs" / "s"
    code = (
        "import time\nfrom retroformer.records import RunLock\n"
        f"RunLock({str(run)!r}, (1, 4)).acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUse, match=rf"shard 1/4 of .* is already running \(pid {proc.pid} on "):
            run_trials(cfg_for(tmp_path, shard="1/4"), progress=False)
        assert not records_path(run, (1, 4)).exists()
        # another shard runs beside it; an unsharded run of the directory does not
        assert run_trials(cfg_for(tmp_path, shard="0/4"), progress=False).new_episodes > 0
        with pytest.raises(RunInUse, match=rf"in use by shards of its run \(run.shard-1-of-4.lock: pid {proc.pid}"):
            RunLock(run).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert run_trials(cfg_for(tmp_path, shard="1/4"), progress=False).new_episodes > 0  # died with its process
    with RunLock(run, (1, 4)), pytest.raises(RunInUse, match="in use by shards"):
        RunLock(run).acquire()


def test_a_shard_is_refused_while_an_unsharded_run_holds_the_directory(tmp_path):
    with RunLock(tmp_path / "runs" / "s"), pytest.raises(RunInUse, match="in use by an unsharded run"):
        run_trials(cfg_for(tmp_path, shard="0/2"), progress=False)


def test_shards_of_another_count_and_an_unsharded_rerun_are_refused(tmp_path):
    run_trials(cfg_for(tmp_path, shard="0/2"), progress=False)
    with pytest.raises(ConfigError, match=r"shard: .* holds shards of 2 .*got shard=1/4.*--shard I/2"):
        run_trials(cfg_for(tmp_path, shard="1/4"), progress=False)
    with pytest.raises(ConfigError, match=r"shard: .* was run in shards .*got shard=null.*--shard I/2"):
        run_trials(cfg_for(tmp_path), progress=False)
    # all shards of a run agree on the config that gives records their meaning (the resume check)
    with pytest.raises(ConfigError, match=r"memory_size: 3 -> 1"):
        run_trials(cfg_for(tmp_path, shard="1/2", memory_size=1), progress=False)
    saved = yaml.safe_load((tmp_path / "runs" / "s" / "trials" / "config.yaml").read_text())
    assert saved["shard"] is None  # one config for the run; the shard is each process's own


# --- streaming readers ------------------------------------------------------------------------------------------------


def big_record(task: int, trial: int, steps: int = 60) -> EpisodeRecord:
    """An ALFWorld-sized record: tens of steps of long observations."""
    obs = "You arrive at countertop 1. On the countertop 1, you see " + ", ".join(f"a thing {i}" for i in range(60))
    return EpisodeRecord(
        run_name="big",
        task_id=f"task-{task:05d}",
        trial=trial,
        env_name="alfworld",
        env_version="0.4",
        seed=0,
        actor_id="actor",
        reflector_id="refl",
        actor_prompt_hash="h",
        memory=[],
        steps=[Step(f"I think about step {s}.", f"go to countertop {s}", obs) for s in range(steps)],
        return_=float(trial == 1),
        success=trial == 1,
        end_reason="success" if trial == 1 else "done",
        reflection=Reflection("prompt " * 200, f"plan for task {task}", "refl", "p") if trial == 0 else None,
        task_fingerprint="f",
    )


def test_readers_stream_the_records_and_keep_only_an_index(tmp_path):
    path = tmp_path / "episodes.jsonl"
    with path.open("w") as fh:
        for task in range(150):
            for trial in (0, 1):
                fh.write(big_record(task, trial).to_json() + "\n")
    size = path.stat().st_size
    assert size > 150 * 2 * 20_000
    tracemalloc.start()
    try:
        entries, lines = index_records([path])
        summary = summarize_files([path], trials=2)
        rows = sum(1 for _ in iter_rated_reflection_rows([path]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (len(entries), lines, rows, summary["num_rated_reflections"]) == (300, 300, 150, 150)
    assert peak < size / 10, f"peak {peak} bytes for a {size}-byte file"
    # the streamed rows are the in-memory rows
    assert list(iter_rated_reflection_rows([path])) == rated_reflection_rows(read_records(path))


def test_a_dataset_saved_a_shard_at_a_time_loads_whole_and_in_order(tmp_path):
    from retroformer.training.common import load_rated_dataset

    path = tmp_path / "episodes.jsonl"
    path.write_text(
        "".join(big_record(task, trial, steps=2).to_json() + "\n" for task in range(12) for trial in (0, 1))
    )
    rows = list(iter_rated_reflection_rows([path]))
    save_rows_in_shards(iter(rows), tmp_path / "ds", shard_bytes=3000)  # a few rows per shard
    assert len(list((tmp_path / "ds").glob("data-*-of-*.arrow"))) >= 4
    assert load_from_disk(str(tmp_path / "ds")).to_list() == rows
    assert len(load_rated_dataset(str(tmp_path / "ds"), RATED_REFLECTION_COLUMNS)) == 12
    save_rows_in_shards(iter([]), tmp_path / "empty")
    # as save_to_disk writes a dataset of no rows (which datasets cannot load back; the training stages say so)
    assert json.loads((tmp_path / "empty" / "state.json").read_text())["_data_files"] == []
    assert not list(tmp_path.glob("*.part-*"))  # no shard folder left behind


def test_the_index_read_without_steps_agrees_with_the_records_and_reports_a_bad_line_the_same(tmp_path):
    res = run_trials(cfg_for(tmp_path, stop_on_success=False), progress=False)
    path = res.records_file
    entries = list(iter_entries(path))
    assert len(entries) == 120 and any(e.has_reflection for e in entries) and any(e.success for e in entries)
    assert entries == [RecordEntry.of(r, path, offset) for offset, r in iter_records_at(path)]
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace('"schema_version": 1', '"schema_version": 9')
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=rf"{path}:4: episode record has schema_version=9"):
        list(iter_entries(path))
