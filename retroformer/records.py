"""Append-only JSONL store of episode records: one object per line, flushed and fsynced as each episode ends.

A run killed mid-write can leave a partial last line; :func:`read_records` repairs it (drops it with a warning, and the
episode runs again on resume). A corrupt line anywhere else is a clear error naming the file and the line.

A (task, trial) may have several lines: attempts that errored (an LLM or environment failure, or a reflector
failure) are kept as history and a resumed run appends the attempt that replaces them. :func:`effective_records`
keeps the last line of each (run, task, trial): what summaries, ratings and datasets count.

One run at a time writes a run directory: :class:`RunLock` holds an OS file lock on ``trials/run.lock`` for the
whole run (it dies with its process, so a killed run never leaves a stale lock behind).

A run may also be split into shards (DESIGN section 5): shard ``I/N`` runs the tasks whose stable hash of the task id
(:func:`shard_of`) is ``I``, appends to ``trials/episodes.shard-I-of-N.jsonl`` and holds the lock
``trials/run.shard-I-of-N.lock`` (plus a shared lock on ``trials/run.lock``, so that an unsharded run and shards never
write one directory at once). Readers take the union of the files (:func:`record_files`): the unsharded file first,
then the shards; each task lives in one shard, so the last line of each (task, trial) still wins.

Readers stream: :func:`iter_records` yields one record at a time, so memory does not grow with the size of a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retroformer.config import write_atomic
from retroformer.errors import ConfigError, DataError, RunInUse, StorageError
from retroformer.types import ERRORED_END_REASONS, SCHEMA_VERSION, EpisodeRecord

logger = logging.getLogger(__name__)


#: A shard of a run: ``(index, count)``, e.g. ``(0, 4)`` for ``--shard 0/4``.
Shard = tuple[int, int]

_SHARD_FILE_RE = re.compile(r"^episodes\.shard-(\d+)-of-(\d+)\.jsonl$")


def parse_shard(text: str, field_name: str = "shard") -> Shard:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; a ConfigError naming the field, the value and the fix."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    index, count = (int(match.group(1)), int(match.group(2))) if match else (-1, 0)
    if count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"{field_name} must be 'I/N' with 0 <= I < N (shard I of N, counted from 0), got {text!r}; e.g. "
            f"--{field_name} 0/4 ... --{field_name} 3/4 for four shards, or null for the whole run"
        )
    return index, count


def shard_of(task_id: str, count: int) -> int:
    """The shard (of ``count``) a task belongs to: a stable hash of its id (sha256; Python's ``hash`` changes with
    every process), so every process and machine agrees."""
    return int.from_bytes(hashlib.sha256(task_id.encode("utf-8")).digest()[:8], "big") % count


def records_path(run_dir: str | Path, shard: Shard | None = None) -> Path:
    """Where a trials run (``runs/<name>``), or one shard of it, appends its episode records."""
    if shard is None:
        return Path(run_dir) / "trials" / "episodes.jsonl"
    return Path(run_dir) / "trials" / f"episodes.shard-{shard[0]}-of-{shard[1]}.jsonl"


def shard_files(run_dir: str | Path) -> dict[Shard, Path]:
    """The shard record files of a run, by shard, in shard order."""
    folder = Path(run_dir) / "trials"
    found: dict[Shard, Path] = {}
    if folder.is_dir():
        for path in folder.iterdir():
            match = _SHARD_FILE_RE.match(path.name)
            if match:
                found[(int(match.group(1)), int(match.group(2)))] = path
    return dict(sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def record_files(run_dir: str | Path) -> list[Path]:
    """Every records file of a run, in the order readers take them: the unsharded file, then the shards.

    A DataError if shards of different counts were written (their tasks overlap, so no order of the files is right).
    """
    shards = shard_files(run_dir)
    counts = sorted({count for _, count in shards})
    if len(counts) > 1:
        raise DataError(
            f"{Path(run_dir)} holds records of shards of different counts ({', '.join(p.name for p in shards.values())})"
            f"; every shard of a run must use the same N. Keep the files of one N (move the others away), then run "
            f"the missing shards with that N"
        )
    unsharded = records_path(run_dir)
    return ([unsharded] if unsharded.is_file() else []) + list(shards.values())


def config_path(run_dir: str | Path) -> Path:
    """Where a trials run keeps its resolved config."""
    return Path(run_dir) / "trials" / "config.yaml"


def dataset_path(run_dir: str | Path) -> Path:
    """Where a trials run exports its rated reflections."""
    return Path(run_dir) / "datasets" / "rated_reflections"


def summary_path(run_dir: str | Path) -> Path:
    """Where the merge of a run (all its shards) writes its summary."""
    return Path(run_dir) / "trials" / "summary.json"


def config_lock_path(run_dir: str | Path) -> Path:
    """The lock shards of a run take while they check and write the run's config."""
    return Path(run_dir) / "trials" / "config.lock"


def merge_lock_path(run_dir: str | Path) -> Path:
    """The lock taken while the records of a run's shards are merged into its dataset and summary."""
    return Path(run_dir) / "trials" / "merge.lock"


def tasks_path(run_dir: str | Path) -> Path:
    """Where a trials run lists its task ids, one a line (so a report counts tasks that have no record yet)."""
    return Path(run_dir) / "trials" / "tasks.txt"


def write_task_ids(run_dir: str | Path, task_ids: list[str]) -> None:
    write_atomic(tasks_path(run_dir), "".join(f"{t}\n" for t in task_ids))


def read_task_ids(run_dir: str | Path) -> list[str] | None:
    path = tasks_path(run_dir)
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else None


def lock_path(run_dir: str | Path, shard: Shard | None = None) -> Path:
    """The lock file a running trials run (or one shard of it) holds."""
    if shard is None:
        return Path(run_dir) / "trials" / "run.lock"
    return Path(run_dir) / "trials" / f"run.shard-{shard[0]}-of-{shard[1]}.lock"


def _holder(path: Path) -> str:
    """Who holds a lock, as its holder wrote it in the lock file."""
    with open(path, "rb") as fh:
        return fh.read(4096).decode("utf-8", errors="replace").strip() or "unknown process"


def _try_flock(path: Path, mode: int) -> int | None:
    """An open descriptor of ``path`` holding ``flock(mode)``, or None when another holder blocks it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int) -> None:
    # Unlock before closing; the file stays (removing it would race with a run that just opened it).
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def running_shards(run_dir: str | Path) -> list[str]:
    """The holders of the shard locks of a run that are held now (for messages)."""
    held = []
    for path in sorted((Path(run_dir) / "trials").glob("run.shard-*-of-*.lock")):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(f"{path.name}: {_holder(path)}")
        finally:
            os.close(fd)
    return held


class RunLock:
    """An exclusive, non-blocking OS lock (``flock``) on a run directory or one shard of it, held from
    :meth:`acquire` to :meth:`release`.

    An unsharded run locks ``trials/run.lock`` exclusively. A shard locks its own ``run.shard-I-of-N.lock``
    exclusively and ``run.lock`` shared: shards run side by side, and never beside an unsharded run of the same
    directory. The lock file names the holder (pid, host, start time) for the message a second run gets. The OS drops
    the lock when the holding process dies, however it dies, so a lock left by a killed run never blocks the next one.
    Across machines the run directory needs a filesystem whose ``flock`` works between hosts (NFSv4, Lustre mounted
    with ``flock``).
    """

    def __init__(self, run_dir: str | Path, shard: Shard | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.shard = shard
        self.path = lock_path(run_dir, shard)
        self._fds: list[int] = []

    def acquire(self) -> RunLock:
        run_lock = lock_path(self.run_dir)
        if self.shard is None:
            fd = _try_flock(run_lock, fcntl.LOCK_EX)
            if fd is None:
                holder = _holder(run_lock)
                shards = running_shards(self.run_dir)
                if shards:
                    raise RunInUse(
                        f"run directory {self.run_dir} is in use by shards of its run ({'; '.join(shards)}); an "
                        "unsharded run cannot run beside them. Wait for them to finish or stop them, or give this run "
                        "another run_name"
                    )
                raise RunInUse(
                    f"run directory {self.run_dir} is in use by another run ({holder}); wait for that run to finish "
                    "or stop it, or give this run another run_name"
                )
            self._fds = [fd]
        else:
            shared = _try_flock(run_lock, fcntl.LOCK_SH)
            if shared is None:
                holder = _holder(run_lock)
                raise RunInUse(
                    f"run directory {self.run_dir} is in use by an unsharded run ({holder}); shards cannot run beside "
                    "it. Wait for it to finish or stop it, or give this run another run_name"
                )
            fd = _try_flock(self.path, fcntl.LOCK_EX)
            if fd is None:
                holder = _holder(self.path)
                _unlock(shared)
                raise RunInUse(
                    f"shard {self.shard[0]}/{self.shard[1]} of {self.run_dir} is already running ({holder}); each "
                    "shard runs in one process at a time. Wait for it to finish or stop it, or start another shard"
                )
            self._fds = [shared, fd]
        holder = (
            f"pid {os.getpid()} on {socket.gethostname()}, started {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
        )
        own = self._fds[-1]
        os.ftruncate(own, 0)
        os.pwrite(own, holder.encode("utf-8") + b"\n", 0)
        return self

    def release(self) -> None:
        while self._fds:
            _unlock(self._fds.pop())

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold a blocking exclusive ``flock`` on ``path`` for a short critical section (config check, merge)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        _unlock(fd)


def effective_records(records: Iterable[EpisodeRecord]) -> list[EpisodeRecord]:
    """The last record of each (run, task, trial), in file order: later attempts replace earlier errored ones."""
    last: dict[tuple[str, str, int], EpisodeRecord] = {}
    for rec in records:
        key = (rec.run_name, rec.task_id, rec.trial)
        last.pop(key, None)  # re-insert, so the order is that of the replacing line
        last[key] = rec
    return list(last.values())


def _to_record(p: Path, number: int, data: dict) -> EpisodeRecord:
    try:
        return EpisodeRecord.from_dict(data)
    except (TypeError, KeyError) as exc:
        raise DataError(f"{p}:{number}: not an episode record ({exc})") from None
    except DataError as exc:
        raise DataError(f"{p}:{number}: {exc}") from None


def _iter_lines(p: Path, repair: bool, skip_partial: bool) -> Iterator[tuple[int, int, dict]]:
    """(byte offset, line number, parsed JSON) of each line of a records file, one line in memory at a time."""
    if not p.exists():
        return
    with p.open("rb") as fh:
        offset = 0
        for number, line in enumerate(fh, start=1):
            whole = line.endswith(b"\n")  # only the last line of a file can lack its newline
            if line.strip():
                try:
                    data = json.loads(line.decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    if not whole:  # the write of this last line was cut off
                        if skip_partial and not repair:
                            return
                        if not repair:
                            raise DataError(f"{p}:{number}: partial last line (a crash during a write?)") from None
                        logger.warning("%s:%d: dropping a partial last line left by an interrupted write", p, number)
                        with p.open("r+b") as out:
                            out.truncate(offset)
                        return
                    what = exc.msg if isinstance(exc, json.JSONDecodeError) else f"invalid UTF-8 at byte {exc.start}"
                    raise DataError(
                        f"{p}:{number}: not valid JSON ({what}); this line is corrupt. Fix or remove the line, "
                        "then run again (episodes whose lines are removed are re-run)."
                    ) from None
                if not whole and repair:
                    logger.warning("%s:%d: the last line lacks its newline; adding it", p, number)
                    with p.open("ab") as out:
                        out.write(b"\n")
                yield offset, number, data
            offset += len(line)


def iter_records_at(
    path: str | Path, repair: bool = True, skip_partial: bool = False
) -> Iterator[tuple[int, EpisodeRecord]]:
    """Each record of a file with the byte offset of its line (for :func:`read_record_at`), one line in memory at a
    time. History included (see :func:`effective_records`); ``repair`` and ``skip_partial`` as in :func:`iter_records`.
    """
    p = Path(path)
    for offset, number, data in _iter_lines(p, repair, skip_partial):
        yield offset, _to_record(p, number, data)


def iter_entries(path: str | Path) -> Iterator[RecordEntry]:
    """A :class:`RecordEntry` of each line of a file (read only, as :func:`iter_run_records`), without building the
    record's steps: about twice as fast as :func:`iter_records` for readers that need only the index."""
    p = Path(path)
    for offset, number, data in _iter_lines(p, repair=False, skip_partial=True):
        try:
            if data.get("schema_version") != SCHEMA_VERSION:
                raise KeyError("schema_version")
            entry = RecordEntry.of_data(data, p, offset)
        except (KeyError, TypeError, AttributeError, ValueError):
            entry = RecordEntry.of(_to_record(p, number, data), p, offset)  # the full parse says what is wrong
        yield entry


def iter_records(path: str | Path, repair: bool = True, skip_partial: bool = False) -> Iterator[EpisodeRecord]:
    """The records of a file, one at a time, history included (see :func:`effective_records`).

    A partial last line (crash mid-write, possibly inside a multi-byte character) is truncated away when ``repair``;
    a whole last line that lacks its newline gets one, so that the next append starts a line of its own. Readers
    that must not write (a report of a run that may be running) pass ``repair=False, skip_partial=True``: a partial
    last line is then left alone and not returned.
    """
    for _, record in iter_records_at(path, repair=repair, skip_partial=skip_partial):
        yield record


def read_records(path: str | Path, repair: bool = True, skip_partial: bool = False) -> list[EpisodeRecord]:
    """All records of a file in a list (see :func:`iter_records`; prefer it for large files)."""
    return list(iter_records(path, repair=repair, skip_partial=skip_partial))


def read_record_at(path: str | Path, offset: int) -> EpisodeRecord:
    """The record whose line starts at byte ``offset`` of ``path`` (an offset from :func:`iter_records_at`)."""
    with Path(path).open("rb") as fh:
        fh.seek(offset)
        line = fh.readline()
    try:
        data = json.loads(line.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: no whole record at byte {offset}; was the file changed while it was read?") from None
    return _to_record(Path(path), 0, data)


def iter_run_records(run_dir: str | Path) -> Iterator[EpisodeRecord]:
    """Every record of a run across its files (:func:`record_files`), read only: a run may be writing them."""
    for path in record_files(run_dir):
        yield from iter_records(path, repair=False, skip_partial=True)


@dataclass(slots=True)
class RecordEntry:
    """What summaries, ratings and resume need of one record line, without its steps and prompts; ``path`` and
    ``offset`` find the whole line again (:func:`read_record_at`)."""

    run_name: str
    task_id: str
    trial: int
    end_reason: str
    success: bool
    return_: float
    errored: bool
    has_reflection: bool
    num_invalid_actions: int
    task_fingerprint: str
    path: Path | None = None
    offset: int = -1
    #: The reflection's text, kept only where asked (resume needs it for the next trial's memory).
    reflection_text: str | None = None

    @classmethod
    def of(cls, rec: EpisodeRecord, path: Path | None = None, offset: int = -1, keep_text: bool = False) -> RecordEntry:
        return cls(
            # Interned: these repeat on every line, and a run's index holds one entry per (task, trial).
            run_name=sys.intern(rec.run_name),
            task_id=rec.task_id,
            trial=rec.trial,
            end_reason=sys.intern(rec.end_reason),
            success=rec.success,
            return_=rec.return_,
            errored=rec.errored,
            has_reflection=rec.reflection is not None,
            num_invalid_actions=rec.num_invalid_actions,
            task_fingerprint=sys.intern(rec.task_fingerprint),
            path=path,
            offset=offset,
            reflection_text=rec.reflection.text if keep_text and rec.reflection is not None else None,
        )

    @classmethod
    def of_data(cls, data: dict[str, Any], path: Path | None = None, offset: int = -1) -> RecordEntry:
        """The entry of a record's parsed JSON line (as :meth:`of` of the record, without building it)."""
        end_reason = data["end_reason"]
        return cls(
            run_name=sys.intern(data["run_name"]),
            task_id=data["task_id"],
            trial=int(data["trial"]),
            end_reason=sys.intern(end_reason),
            success=bool(data["success"]),
            return_=float(data["return_"]),
            errored=end_reason in ERRORED_END_REASONS or data.get("error") is not None,
            has_reflection=data.get("reflection") is not None,
            num_invalid_actions=int(data.get("num_invalid_actions", 0)),
            task_fingerprint=sys.intern(data.get("task_fingerprint", "")),
            path=path,
            offset=offset,
        )


def effective_entries(entries: Iterable[RecordEntry]) -> tuple[list[RecordEntry], int]:
    """:func:`effective_records` of entries; and the number of entries given (history included)."""
    last: dict[tuple[str, str, int], RecordEntry] = {}
    lines = 0
    for entry in entries:
        lines += 1
        key = (entry.run_name, entry.task_id, entry.trial)
        last.pop(key, None)  # re-insert, so the order is that of the replacing line
        last[key] = entry
    return list(last.values()), lines


def index_records(files: Iterable[str | Path]) -> tuple[list[RecordEntry], int]:
    """The last line of each (run, task, trial) across ``files`` (read only), as :class:`RecordEntry`, in the order
    of :func:`effective_records`; and the number of lines read (history included)."""
    return effective_entries(entry for path in files for entry in iter_entries(path))


class RecordWriter:
    """Appends records to one JSONL file: whole lines in one write, then fsync. :class:`GroupCommit` feeds it from an
    event loop, several records per fsync.

    A write that fails (a full disk, a lost mount) is undone: the file is cut back to where it ended before, so it
    never holds a partial record followed by whole ones, and :class:`~retroformer.errors.StorageError` says what
    happened and how to resume."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append_many(self, records: Sequence[EpisodeRecord]) -> None:
        """Write ``records`` in order, then fsync once; on failure nothing of them stays in the file."""
        data = "".join(record.to_json() + "\n" for record in records).encode("utf-8")
        with self._lock:
            if self._fd is None:
                raise StorageError(f"{self.path}: the records file was closed; this run can save no more records")
            start = os.fstat(self._fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
            except OSError as exc:
                self._undo(start)
                raise StorageError(
                    f"could not save {len(records)} episode record(s) to {self.path}: {exc.strerror or exc}. The "
                    "records written before are kept and these episodes will run again: free space on that "
                    "filesystem (or set runs_dir to another one, and move the run directory there), then run the same "
                    "command again to resume"
                ) from exc

    def _undo(self, size: int) -> None:
        """Cut the file back to ``size`` bytes after a failed write (best effort: the reader drops a partial last line
        anyway)."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        except OSError as exc:
            logger.warning("%s: could not remove a partly written record (%s); resume will drop it", self.path, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GroupCommit:
    """Saves records from one event loop through a :class:`RecordWriter`, a group at a time: one worker-thread call,
    one write, one flush and one fsync per group. While a group is being written, the records saved meanwhile wait
    and form the next group, so concurrent episodes share an fsync instead of queueing for one each (and a shared
    filesystem, where an fsync takes long, is not the limit). ``await save(record)`` returns once the record is on
    disk, or raises what writing it raised."""

    def __init__(self, writer: RecordWriter, executor: Any = None) -> None:
        self._writer = writer
        self._executor = executor
        self._pending: list[tuple[EpisodeRecord, asyncio.Future]] = []
        self._drain: asyncio.Task | None = None
        self.groups = 0  # groups written so far

    async def save(self, record: EpisodeRecord) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append((record, done))
        if self._drain is None or self._drain.done():
            self._drain = loop.create_task(self._write_groups())
        await done

    async def _write_groups(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            group, self._pending = self._pending, []
            try:
                await loop.run_in_executor(self._executor, self._writer.append_many, [r for r, _ in group])
            except asyncio.CancelledError:
                for _, done in group + self._pending:
                    done.cancel()
                raise
            except Exception as exc:
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc)
                continue
            self.groups += 1
            for _, done in group:
                if not done.done():
                    done.set_result(None)
