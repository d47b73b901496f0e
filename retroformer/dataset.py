"""Rated reflections: built from episode records by a pure function, saved in Hugging Face ``datasets`` form.

A row pairs the reflection prompt ``x[k,i]`` and reflection ``y[k,i]`` with its rating
``r = G[k,i+1] - G[k,i]`` (paper section 4.1): how much the next attempt improved. A reflection whose next attempt
was not run, or errored, has no rating and no row.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from retroformer.records import effective_records
from retroformer.types import ERRORED_END_REASONS, RATED_REFLECTION_COLUMNS, EpisodeRecord


def rated_reflection_rows(records: list[EpisodeRecord]) -> list[dict[str, Any]]:
    """One row per reflection whose next attempt finished; columns are ``RATED_REFLECTION_COLUMNS``.

    Attempts replaced by a later line of the same (run, task, trial) are history and give no row.
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
        rows.append(
            {
                "prompt": rec.reflection.prompt,
                "reflection": rec.reflection.text,
                "rating": float(nxt.return_ - rec.return_),
                "return_before": float(rec.return_),
                "return_after": float(nxt.return_),
                "success_after": bool(nxt.success),
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
        )
    return rows


def rows_to_dataset(rows: list[dict[str, Any]]):
    """A ``datasets.Dataset`` with the fixed schema (also when there are no rows)."""
    from datasets import Dataset, Features, Value

    string_cols = set(RATED_REFLECTION_COLUMNS) - {
        "rating",
        "return_before",
        "return_after",
        "success_after",
        "trial",
        "seed",
    }
    features = Features(
        {
            c: Value("string")
            if c in string_cols
            else Value("bool")
            if c == "success_after"
            else Value("int64")
            if c in ("trial", "seed")
            else Value("float64")
            for c in RATED_REFLECTION_COLUMNS
        }
    )
    columns = {c: [row[c] for row in rows] for c in RATED_REFLECTION_COLUMNS}
    return Dataset.from_dict(columns, features=features)


def export_rated_reflections(records: list[EpisodeRecord], path: str | Path) -> Path:
    """Save the rated reflections of ``records`` to ``path``.

    Written to a fresh temporary folder beside ``path``, then swapped in by renames, so that ``path`` always holds a
    whole dataset (the old one or the new one) and two writers never share a temporary folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = tmp.with_suffix(".old")
    try:
        rows_to_dataset(rated_reflection_rows(records)).save_to_disk(str(tmp / "data"))
        if path.exists():
            path.rename(old)
        (tmp / "data").rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.exists():  # else the old dataset stays at `old` rather than being lost
            shutil.rmtree(old, ignore_errors=True)
    return path
