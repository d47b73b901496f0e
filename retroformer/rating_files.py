"""Rating files of other projects as rated-reflection datasets (``retroformer import-ratings``).

The Retroformer reference code trains its SFT and reward stages on a table of ratings, ``data/hotpotqa_rating.tsv``,
with a reflection prompt (column ``query`` or ``prompt``), a reflection (``response``) and its rating (``rating``).
:func:`import_ratings` reads such a table from TSV, CSV, JSON Lines or Parquet, with configurable column names, and
writes the rated-reflection dataset that ``retroformer trials`` exports (:mod:`retroformer.dataset`), so that
``sft_run.py``, ``reward_run.py`` and ``ppo_run.py`` with ``reward_source: rm`` train on it.

What such a file does not say stays empty: the returns before and after (null), the trial (null) and, unless a
column names them, the task ids (""). Rows without a task id cannot be scored by the online environment reward,
which re-runs the task's next attempt; ``ppo_run.py`` refuses them there and says so.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retroformer.dataset import write_rated_dataset
from retroformer.errors import DataError
from retroformer.types import RATED_REFLECTION_COLUMNS

logger = logging.getLogger(__name__)

#: File name endings and the format they mean.
FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
#: ``reflector_id`` of imported rows: where they came from, for the provenance the trial loop records.
IMPORTED_REFLECTOR = "imported"


@dataclass
class RatingColumns:
    """Which columns of a rating file hold what. Defaults: the reference code's ``hotpotqa_rating.tsv``."""

    prompt: list[str] = field(default_factory=lambda: ["prompt", "query"])  # the first one present is used
    response: str = "response"
    rating: str = "rating"
    task_id: str | None = None  # optional: a column of task ids (then held-out splits keep a task on one side)
    env: str | None = None  # optional: a column of environment names (else every row gets ImportResult.env_name)


@dataclass
class ImportResult:
    path: Path
    rows: int
    skipped_empty: int
    rating_min: float
    rating_max: float
    env_names: dict[str, int]


def file_format(path: Path, fmt: str | None) -> str:
    """The format named by ``fmt`` or, when None, by the file name's ending."""
    if fmt is not None:
        if fmt not in set(FORMATS.values()):
            raise DataError(f"format {fmt!r} is unknown; expected one of {sorted(set(FORMATS.values()))}")
        return fmt
    name = path.name.lower()
    for ending, found in FORMATS.items():
        if name.endswith(ending) or name.endswith(ending + ".txt"):
            return found
    raise DataError(
        f"{path}: cannot tell the format from the file name; name it *.tsv, *.csv, *.jsonl or *.parquet, or pass "
        "--format tsv|csv|jsonl|parquet"
    )


def _delimited(path: Path, delimiter: str, encoding: str) -> Iterator[tuple[int, list[str], dict[str, Any]]]:
    """(line number, header, row) of a TSV or CSV file; fields may be quoted and hold newlines."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a reflection prompt holds a whole trajectory
    with path.open(encoding=encoding, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = list(reader.fieldnames or [])
        for row in reader:
            yield reader.line_num, header, row


def _json_lines(path: Path, encoding: str) -> Iterator[tuple[int, list[str], dict[str, Any]]]:
    with path.open(encoding=encoding) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {n} is not JSON ({exc.msg}); expected one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n} is a JSON {type(row).__name__}, expected an object per line")
            yield n, list(row), row


def _parquet(path: Path) -> Iterator[tuple[int, list[str], dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc}); check the file or pass --format") from None
    header = list(parquet.schema_arrow.names)
    n = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, header, row


def read_rating_file(path: Path, fmt: str, encoding: str = "utf-8") -> Iterator[tuple[int, list[str], dict[str, Any]]]:
    """(line or row number, column names, row) of each row of a rating file."""
    if fmt == "parquet":
        return _parquet(path)
    if fmt == "jsonl":
        return _json_lines(path, encoding)
    return _delimited(path, "\t" if fmt == "tsv" else ",", encoding)


def parse_rating(value: Any, path: Path, where: str, column: str) -> float:
    """A finite float from a rating cell, or a DataError that names the cell."""
    try:
        rating = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        rating = math.nan
    if not math.isfinite(rating):
        raise DataError(
            f"{path}: {where}: rating {value!r} in column {column!r} is not a finite number; every rating must be "
            "numeric (e.g. 1, 0, -0.5)"
        )
    return rating


class _Importer:
    """Turns the rows of one rating file into rated-reflection rows, checking columns and values on the way."""

    def __init__(self, path: Path, fmt: str, columns: RatingColumns, env_name: str) -> None:
        self.path, self.fmt, self.columns, self.env_name = path, fmt, columns, env_name
        self.prompt_column: str | None = None
        self.skipped = 0
        self.ratings: list[float] = []
        self.env_counts: dict[str, int] = {}

    def _check_header(self, header: list[str]) -> None:
        present = [c for c in self.columns.prompt if c in header]
        wanted = [self.columns.response, self.columns.rating]
        wanted += [c for c in (self.columns.task_id, self.columns.env) if c]
        missing = [c for c in wanted if c not in header]
        if not present:
            missing.insert(0, " or ".join(self.columns.prompt))
        if missing:
            raise DataError(
                f"{self.path}: missing column(s) {missing}; the file has {header}. Name the columns with "
                "--prompt-column, --response-column and --rating-column"
            )
        self.prompt_column = present[0]

    def row(self, n: int, header: list[str], raw: dict[str, Any]) -> dict[str, Any] | None:
        if self.prompt_column is None:
            self._check_header(header)
        where = f"line {n}" if self.fmt in ("tsv", "csv", "jsonl") else f"row {n}"
        if any(c not in raw for c in (self.prompt_column, self.columns.response, self.columns.rating)):
            raise DataError(f"{self.path}: {where} lacks a column of the header (it has {sorted(raw)}); fix the row")
        prompt, response = (str(raw[c] or "") for c in (self.prompt_column, self.columns.response))
        if not prompt.strip() or not response.strip():
            self.skipped += 1
            return None
        rating = parse_rating(raw[self.columns.rating], self.path, where, self.columns.rating)
        env = str(raw.get(self.columns.env) or self.env_name) if self.columns.env else self.env_name
        task = str(raw.get(self.columns.task_id) or "") if self.columns.task_id else ""
        self.ratings.append(rating)
        self.env_counts[env] = self.env_counts.get(env, 0) + 1
        out: dict[str, Any] = {c: "" for c in RATED_REFLECTION_COLUMNS}
        out.update(prompt=prompt, reflection=response, rating=rating, return_before=None, return_after=None,
                   success_after=None, task_id=task, trial=None, seed=None, env_name=env,
                   run_name=f"import:{self.path.name}", reflector_id=IMPORTED_REFLECTOR)  # fmt: skip
        return out

    def rows(self, encoding: str) -> Iterator[dict[str, Any]]:
        try:
            for n, header, raw in read_rating_file(self.path, self.fmt, encoding):
                row = self.row(n, header, raw)
                if row is not None:
                    yield row
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{self.path}: not {encoding} text (byte {exc.object[exc.start : exc.start + 1]!r} at offset "
                f"{exc.start} of a read block); re-encode it (iconv -f latin1 -t utf-8) or pass --encoding latin-1"
            ) from None
        except csv.Error as exc:
            raise DataError(f"{self.path}: not a readable {self.fmt.upper()} file ({exc}); check its quoting") from None
        if self.prompt_column is None:  # no rows at all: the header still says whether the columns are there
            raise DataError(f"{self.path}: no rows; expected a header line and one rating per line")


def import_ratings(
    path: str | Path,
    out: str | Path,
    columns: RatingColumns | None = None,
    fmt: str | None = None,
    encoding: str = "utf-8",
    env_name: str = "imported",
) -> ImportResult:
    """Read the rating file ``path`` and save it as a rated-reflection dataset at ``out``.

    ``out`` must not exist, or be a saved dataset (it is then replaced). Raises :class:`DataError` with one line for a
    missing file or column, a non-numeric rating, text that is not in ``encoding``, or a file without usable rows.
    """
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a rating file (TSV, CSV, JSON Lines or Parquet)")
    if out.exists() and not (out / "dataset_info.json").is_file():
        raise DataError(f"--out {out} exists and is not a saved dataset; choose a new directory or remove it")
    importer = _Importer(path, file_format(path, fmt), columns or RatingColumns(), env_name)
    rows = list(importer.rows(encoding))  # read to the end before writing: a bad row must not leave half a dataset
    if not rows:
        raise DataError(
            f"{path}: every row has an empty prompt or response ({importer.skipped} rows); nothing to train on"
        )
    if importer.skipped:
        logger.warning("%s: skipped %d rows with an empty prompt or response", path, importer.skipped)
    write_rated_dataset(rows, out)
    return ImportResult(out, len(rows), importer.skipped, min(importer.ratings), max(importer.ratings),
                        importer.env_counts)  # fmt: skip
