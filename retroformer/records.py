"""Append-only JSONL store of episode records: one object per line, flushed and fsynced as each episode ends.

A run killed mid-write can leave a partial last line; :func:`read_records` repairs it (drops it with a warning, and the
episode runs again on resume). A corrupt line anywhere else is a clear error naming the file and the line.

A (task, trial) may have several lines: attempts that errored (an LLM or environment failure, or a reflector
failure) are kept as history and a resumed run appends the attempt that replaces them. :func:`effective_records`
keeps the last line of each (run, task, trial): what summaries, ratings and datasets count.

One run at a time writes a run directory: :class:`RunLock` holds an OS file lock on ``trials/run.lock`` for the
whole run (it dies with its process, so a killed run never leaves a stale lock behind).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path

from retroformer.errors import DataError, RunInUse
from retroformer.types import EpisodeRecord

logger = logging.getLogger(__name__)


def records_path(run_dir: str | Path) -> Path:
    """Where a trials run (``runs/<name>``) keeps its episode records."""
    return Path(run_dir) / "trials" / "episodes.jsonl"


def config_path(run_dir: str | Path) -> Path:
    """Where a trials run keeps its resolved config."""
    return Path(run_dir) / "trials" / "config.yaml"


def dataset_path(run_dir: str | Path) -> Path:
    """Where a trials run exports its rated reflections."""
    return Path(run_dir) / "datasets" / "rated_reflections"


def tasks_path(run_dir: str | Path) -> Path:
    """Where a trials run lists its task ids, one a line (so a report counts tasks that have no record yet)."""
    return Path(run_dir) / "trials" / "tasks.txt"


def write_task_ids(run_dir: str | Path, task_ids: list[str]) -> None:
    path = tasks_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text("".join(f"{t}\n" for t in task_ids), encoding="utf-8")
    os.replace(tmp, path)


def read_task_ids(run_dir: str | Path) -> list[str] | None:
    path = tasks_path(run_dir)
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else None


def lock_path(run_dir: str | Path) -> Path:
    """The lock file a running trials run holds."""
    return Path(run_dir) / "trials" / "run.lock"


class RunLock:
    """An exclusive, non-blocking OS lock (``flock``) on a run directory, held from :meth:`acquire` to :meth:`release`.

    The lock file names the holder (pid, host, start time) for the message a second run gets. The OS drops the lock
    when the holding process dies, however it dies, so a lock left by a killed run never blocks the next one.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = lock_path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunInUse(
                f"run directory {self.run_dir} is in use by another run ({holder}); wait for that run to finish or "
                "stop it, or give this run another run_name"
            ) from None
        holder = (
            f"pid {os.getpid()} on {socket.gethostname()}, started {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode("utf-8") + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # Unlock before closing; the file stays (removing it would race with a run that just opened it).
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def effective_records(records: list[EpisodeRecord]) -> list[EpisodeRecord]:
    """The last record of each (run, task, trial), in file order: later attempts replace earlier errored ones."""
    last: dict[tuple[str, str, int], EpisodeRecord] = {}
    for rec in records:
        key = (rec.run_name, rec.task_id, rec.trial)
        last.pop(key, None)  # re-insert, so the order is that of the replacing line
        last[key] = rec
    return list(last.values())


def read_records(path: str | Path, repair: bool = True, skip_partial: bool = False) -> list[EpisodeRecord]:
    """All records of a file, history included (see :func:`effective_records`).

    A partial last line (crash mid-write, possibly inside a multi-byte character) is truncated away when ``repair``;
    a whole last line that lacks its newline gets one, so that the next append starts a line of its own. Readers
    that must not write (a report of a run that may be running) pass ``repair=False, skip_partial=True``: a partial
    last line is then left alone and not returned.
    """
    p = Path(path)
    if not p.exists():
        return []
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    records: list[EpisodeRecord] = []
    offset = 0
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines)
        if line.strip():
            try:
                data = json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                if is_last:  # no trailing newline: the write of this line was cut off
                    if skip_partial and not repair:
                        break
                    if not repair:
                        raise DataError(f"{p}:{number}: partial last line (a crash during a write?)") from None
                    logger.warning("%s:%d: dropping a partial last line left by an interrupted write", p, number)
                    with p.open("r+b") as fh:
                        fh.truncate(offset)
                    break
                what = exc.msg if isinstance(exc, json.JSONDecodeError) else f"invalid UTF-8 at byte {exc.start}"
                raise DataError(
                    f"{p}:{number}: not valid JSON ({what}); this line is corrupt. Fix or remove the line, "
                    "then run again (episodes whose lines are removed are re-run)."
                ) from None
            if is_last and repair:
                logger.warning("%s:%d: the last line lacks its newline; adding it", p, number)
                with p.open("ab") as fh:
                    fh.write(b"\n")
            try:
                records.append(EpisodeRecord.from_dict(data))
            except (TypeError, KeyError) as exc:
                raise DataError(f"{p}:{number}: not an episode record ({exc})") from None
            except DataError as exc:
                raise DataError(f"{p}:{number}: {exc}") from None
        offset += len(line) + 1
    return records


class RecordWriter:
    """Appends records to one JSONL file; each append is one ``write`` of a whole line, then flush + fsync."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fh = self.path.open("a", encoding="utf-8")

    def append(self, record: EpisodeRecord) -> None:
        line = record.to_json() + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            self._fh.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
