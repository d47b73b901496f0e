"""GroupCommit: concurrent saves share a write and an fsync, each save returns once its record is on disk."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from retroformer.records import GroupCommit, RecordWriter, read_records
from retroformer.types import EpisodeRecord


def record(i: int) -> EpisodeRecord:
    return EpisodeRecord(
        run_name="r", task_id=f"t{i}", trial=0, env_name="synthetic", env_version="1", seed=0, actor_id="a",
        reflector_id="none", actor_prompt_hash="h", memory=[], steps=[], return_=0.0, success=False, end_reason="done",
    )  # fmt: skip


class SlowWriter(RecordWriter):
    """A writer whose every write takes a while (a disk or network filesystem), so that saves pile up meanwhile."""

    def __init__(self, path, fail_on: str | None = None) -> None:
        super().__init__(path)
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def append_many(self, records) -> None:
        self.calls.append([r.task_id for r in records])
        time.sleep(0.05)
        if self.fail_on in {r.task_id for r in records}:
            raise OSError(28, "No space left on device")
        super().append_many(records)


def test_concurrent_saves_share_writes_and_each_returns_once_on_disk(tmp_path):
    path = tmp_path / "records.jsonl"
    writer = SlowWriter(path)
    on_disk_at_return: dict[str, bool] = {}

    async def main():
        commit = GroupCommit(writer, ThreadPoolExecutor(2))

        async def save(i: int):
            await asyncio.sleep(0.002 * i)  # saves arrive spread over the first write
            await commit.save(record(i))
            on_disk_at_return[f"t{i}"] = f'"t{i}"' in path.read_text()

        await asyncio.gather(*(save(i) for i in range(40)))
        return commit.groups

    groups = asyncio.run(main())
    writer.close()
    assert sorted(r.task_id for r in read_records(path)) == sorted(f"t{i}" for i in range(40))
    assert all(on_disk_at_return.values()) and len(on_disk_at_return) == 40
    # One write per group, each record in exactly one, in the order the saves came.
    written = [t for call in writer.calls for t in call]
    assert written == [f"t{i}" for i in range(40)]
    assert groups == len(writer.calls) < 10


def test_a_failed_write_fails_its_saves_and_later_saves_still_land(tmp_path):
    path = tmp_path / "records.jsonl"
    writer = SlowWriter(path, fail_on="t0")

    async def main():
        commit = GroupCommit(writer, ThreadPoolExecutor(1))
        first = asyncio.ensure_future(commit.save(record(0)))
        await asyncio.sleep(0.01)  # t0's group is being written: t1 and t2 form the next one
        rest = [asyncio.ensure_future(commit.save(record(i))) for i in (1, 2)]
        with pytest.raises(OSError, match="No space left"):
            await first
        await asyncio.gather(*rest)

    asyncio.run(main())
    writer.close()
    assert [r.task_id for r in read_records(path)] == ["t1", "t2"]
    assert writer.calls == [["t0"], ["t1", "t2"]]


def test_saves_from_one_loop_use_one_worker_call_per_group(tmp_path):
    # The point of the group: far fewer thread hops and fsyncs than records when many episodes end together.
    writer = RecordWriter(tmp_path / "records.jsonl")

    async def main():
        commit = GroupCommit(writer, ThreadPoolExecutor(4))
        await asyncio.gather(*(commit.save(record(i)) for i in range(64)))
        return commit.groups

    groups = asyncio.run(main())
    writer.close()
    assert len(list(read_records(tmp_path / "records.jsonl"))) == 64
    assert groups <= 2  # all 64 are saved in the same loop iteration: the first group has one, the next the rest
