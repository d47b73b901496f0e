"""Rated reflections: built from episode records by a pure function, saved in Hugging Face ``datasets`` form.

A row pairs the reflection prompt ``x[k,i]`` and reflection ``y[k,i]`` with its rating
``r = G[k,i+1] - G[k,i]`` (paper section 4.1): how much the next attempt improved. A reflection whose next attempt
was not run, or errored, has no rating and no row.

:func:`export_rated_reflections` streams: it indexes the records files (a few fields per (task, trial)), then reads
back only the lines that give a row, and writes the rows a shard at a time (:func:`save_rows_in_shards`), so its
memory does not grow with the number of episodes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from retroformer.errors import DataError
from retroformer.records import RecordEntry, effective_records, index_records, read_record_at
from retroformer.types import ERRORED_END_REASONS, RATED_REFLECTION_COLUMNS, EpisodeRecord


def _row(rec: EpisodeRecord, return_after: float, success_after: bool) -> dict[str, Any]:
    return {
        "prompt": rec.reflection.prompt,
        "reflection": rec.reflection.text,
        "rating": float(return_after - rec.return_),
        "return_before": float(rec.return_),
        "return_after": float(return_after),
        "success_after": bool(success_after),
        "task_id": rec.task_id,
        "trial": rec.trial,
        "run_name": rec.run_name,
        "env_name": rec.env_name,
        "env_version": rec.env_version,
        "actor_id": rec.actor_id,
        "reflector_id": rec.reflection.reflector_id,
        "actor_prompt_hash": rec.actor_prompt_hash,
        "reflector_prompt_hash": rec.reflection.prompt_hash,
        "task_fingerprint": rec.task_fingerprint,
        "seed": rec.seed,
    }


def rated_reflection_rows(records: Iterable[EpisodeRecord]) -> list[dict[str, Any]]:
    """One row per reflection whose next attempt finished; columns are ``RATED_REFLECTION_COLUMNS``.

    Attempts replaced by a later line of the same (run, task, trial) are history and give no row. Holds every record
    in memory; :func:`iter_rated_reflection_rows` streams from the records files.
    """
    records = effective_records(records)
    by_key = {(r.run_name, r.task_id, r.trial): r for r in records}
    rows = []
    for rec in sorted(records, key=lambda r: (r.run_name, r.task_id, r.trial)):
        if rec.reflection is None:
            continue
        nxt = by_key.get((rec.run_name, rec.task_id, rec.trial + 1))
        if nxt is None or nxt.end_reason in ERRORED_END_REASONS:
            continue
        rows.append(_row(rec, nxt.return_, nxt.success))
    return rows


def iter_rated_reflection_rows(
    files: Sequence[str | Path], index: list[RecordEntry] | None = None
) -> Iterator[dict[str, Any]]:
    """The rows of :func:`rated_reflection_rows` over records files (read only), in the same order, streamed: an index
    of a few fields per (task, trial) first (``index``, when the caller has built it already: the effective entries of
    ``files``), then only the lines that give a row are read back."""
    entries = index if index is not None else index_records(files)[0]
    by_key = {(e.run_name, e.task_id, e.trial): e for e in entries}
    for key in sorted(by_key):
        entry = by_key[key]
        if not entry.has_reflection:
            continue
        nxt = by_key.get((key[0], key[1], key[2] + 1))
        if nxt is None or nxt.end_reason in ERRORED_END_REASONS:
            continue
        yield _row(read_record_at(entry.path, entry.offset), nxt.return_, nxt.success)


def rated_reflection_features():
    """The fixed schema of the rated-reflection dataset."""
    from datasets import Features, Value

    numeric = {"rating": "float64", "return_before": "float64", "return_after": "float64", "trial": "int64"}
    numeric |= {"seed": "int64", "success_after": "bool"}
    return Features({c: Value(numeric.get(c, "string")) for c in RATED_REFLECTION_COLUMNS})


def rows_to_dataset(rows: list[dict[str, Any]]):
    """A ``datasets.Dataset`` with the fixed schema (also when there are no rows)."""
    from datasets import Dataset

    columns = {c: [row[c] for row in rows] for c in RATED_REFLECTION_COLUMNS}
    return Dataset.from_dict(columns, features=rated_reflection_features())


#: Rows are written in shards of about this many bytes of text: what export holds in memory at a time (one shard's
#: table, read back by ``save_to_disk``), whatever the size of the dataset.
SHARD_TEXT_BYTES = 64 * 2**20


def _text_bytes(row: dict[str, Any]) -> int:
    return sum(len(v) for v in row.values() if isinstance(v, str))


def save_rows_in_shards(rows: Iterable[dict[str, Any]], path: str | Path, shard_bytes: int = SHARD_TEXT_BYTES) -> None:
    """Save rows as a Hugging Face dataset at ``path`` (a new folder), a shard of rows at a time.

    Each shard is written by ``datasets.Dataset.from_generator`` (in batches, to a cache of its own beside ``path``)
    and saved by ``save_to_disk``; the shards' data files are then gathered into one folder whose ``state.json`` lists
    them: the layout of ``save_to_disk(num_shards=n)``, read by ``load_from_disk``. One ``from_generator`` over all
    rows would not do: ``save_to_disk`` reads the generated table back through a memory map, which the process's
    resident memory counts, so it would grow with the dataset.
    """
    from datasets import Dataset

    path = Path(path)
    rows = iter(rows)
    state: dict[str, Any] = {"next": next(rows, None)}
    if state["next"] is None:  # `from_generator` cannot build a dataset of no rows
        rows_to_dataset([]).save_to_disk(str(path))
        return

    def shard_rows() -> Iterator[dict[str, Any]]:
        size = 0
        while state["next"] is not None and size < shard_bytes:
            row = state["next"]
            size += _text_bytes(row)
            yield row
            state["next"] = next(rows, None)

    parts: list[Path] = []
    try:
        while state["next"] is not None:
            part = path.with_name(f"{path.name}.part-{len(parts):05d}")
            parts.append(part)
            cache = part.with_name(part.name + ".cache")
            # A fingerprint given, so that `datasets` neither hashes the generator nor finds an older build to reuse.
            shard = Dataset.from_generator(
                shard_rows, features=rated_reflection_features(), cache_dir=str(cache), fingerprint=uuid.uuid4().hex
            )
            shard.save_to_disk(str(part))
            del shard  # unmaps the cache before it is removed
            shutil.rmtree(cache)
            data_files = sorted(p.name for p in part.glob("data-*.arrow"))
            if data_files != ["data-00000-of-00001.arrow"]:
                raise DataError(f"{part}: expected one data file from save_to_disk, got {data_files}")
        if len(parts) == 1:
            parts.pop().rename(path)
            return
        path.mkdir()
        names = [f"data-{k:05d}-of-{len(parts):05d}.arrow" for k in range(len(parts))]
        for part, name in zip(parts, names, strict=True):
            (part / "data-00000-of-00001.arrow").rename(path / name)
        saved = json.loads((parts[0] / "state.json").read_text(encoding="utf-8"))
        saved["_data_files"] = [{"filename": name} for name in names]
        (path / "state.json").write_text(json.dumps(saved, indent=2, sort_keys=True), encoding="utf-8")
        (parts[0] / "dataset_info.json").rename(path / "dataset_info.json")
    finally:
        for part in parts:
            shutil.rmtree(part, ignore_errors=True)
            shutil.rmtree(part.with_name(part.name + ".cache"), ignore_errors=True)


def write_rated_dataset(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Save rated-reflection ``rows`` to ``path`` (see :func:`save_rows_in_shards`).

    Written to a fresh temporary folder beside ``path``, then swapped in by renames, so that ``path`` always holds a
    whole dataset (the old one or the new one) and two writers never share a temporary folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = tmp.with_suffix(".old")
    try:
        save_rows_in_shards(rows, tmp / "data")
        if path.exists():
            path.rename(old)
        (tmp / "data").rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.exists():  # else the old dataset stays at `old` rather than being lost
            shutil.rmtree(old, ignore_errors=True)
    return path


def export_rated_reflections(
    files: Sequence[str | Path], path: str | Path, index: list[RecordEntry] | None = None
) -> Path:
    """Save the rated reflections of the records ``files`` (a run's :func:`~retroformer.records.record_files`) to
    ``path``, streaming (see the module docstring and :func:`save_rows_in_shards`) and atomically
    (:func:`write_rated_dataset`); ``index`` as in :func:`iter_rated_reflection_rows`."""
    return write_rated_dataset(iter_rated_reflection_rows(files, index), path)
