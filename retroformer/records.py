"""Append-only JSONL store of episode records: one object per line, flushed and fsynced as each episode ends.

A run killed mid-write can leave a partial last line; :func:`read_records` repairs it (drops it with a warning, and the
episode runs again on resume). A corrupt line anywhere else is a clear error naming the file and the line.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from retroformer.errors import DataError
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


def read_records(path: str | Path, repair: bool = True) -> list[EpisodeRecord]:
    """All records of a file. A partial last line (crash mid-write) is truncated away when ``repair``."""
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
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                if is_last:  # no trailing newline: the write of this line was cut off
                    if not repair:
                        raise DataError(f"{p}:{number}: partial last line (a crash during a write?)") from None
                    logger.warning("%s:%d: dropping a partial last line left by an interrupted write", p, number)
                    with p.open("r+b") as fh:
                        fh.truncate(offset)
                    break
                raise DataError(
                    f"{p}:{number}: not valid JSON ({exc.msg}); this line is corrupt. Fix or remove the line, "
                    "then run again (episodes whose lines are removed are re-run)."
                ) from None
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
