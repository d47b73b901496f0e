"""`retroformer import-ratings`: rating tables (the reference code's TSV layout, CSV, JSON Lines, Parquet) become the
rated-reflection dataset the three stages train on; bad files fail with one line that says what to fix."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers_training import load_script, tiny_models  # noqa: F401

from retroformer.cli import main as cli_main
from retroformer.dataset import rated_reflection_features
from retroformer.errors import DataError
from retroformer.rating_files import RatingColumns, import_ratings
from retroformer.types import RATED_REFLECTION_COLUMNS

torch.set_num_threads(1)
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ratings"


def source_rows() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "ratings.jsonl").read_text(encoding="utf-8").splitlines()]


def load(path: Path) -> list[dict]:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    assert ds.features == rated_reflection_features()
    return list(ds)


def write_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(source_rows()), path)
    return path


@pytest.mark.parametrize("name", ["original_style.tsv", "ratings.csv", "ratings.jsonl", "ratings.parquet"])
def test_import_ratings_round_trips_each_format(tmp_path, name):
    src = write_parquet(tmp_path / name) if name.endswith(".parquet") else FIXTURES / name
    result = import_ratings(src, tmp_path / "out")
    rows = load(tmp_path / "out")
    expected = source_rows()
    assert result.rows == len(rows) == len(expected)
    assert [r["prompt"] for r in rows] == [e["prompt"] for e in expected]  # `query` of the TSV, quoted newlines kept
    assert [r["reflection"] for r in rows] == [e["response"] for e in expected]
    assert [r["rating"] for r in rows] == [e["rating"] for e in expected]
    assert (result.rating_min, result.rating_max) == (-1.0, 1.0)
    first = rows[0]
    assert set(first) == set(RATED_REFLECTION_COLUMNS)
    assert first["task_id"] == "" and first["trial"] is None and first["return_before"] is None
    assert first["env_name"] == "imported" and first["run_name"] == f"import:{name}"


def test_import_ratings_columns_are_configurable(tmp_path):
    renamed = tmp_path / "renamed.csv"
    with renamed.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "y", "score", "task", "env"])
        for k, row in enumerate(source_rows()):
            writer.writerow([row["prompt"], row["response"], row["rating"], f"t{k}", "webshop"])
    columns = RatingColumns(prompt=["x"], response="y", rating="score", task_id="task", env="env")
    import_ratings(renamed, tmp_path / "out", columns)
    rows = load(tmp_path / "out")
    assert [r["task_id"] for r in rows] == ["t0", "t1", "t2", "t3"]
    assert {r["env_name"] for r in rows} == {"webshop"}
    assert rows[2]["rating"] == -1.0
    # the same through the command line; an existing dataset at --out is replaced
    argv = ["import-ratings", str(FIXTURES / "ratings.csv"), "--out", str(tmp_path / "out"), "--task-id-column",
            "task", "--env-column", "env"]  # fmt: skip
    assert cli_main(argv) == 0
    rows = load(tmp_path / "out")
    assert [r["env_name"] for r in rows] == ["hotpotqa", "hotpotqa", "alfworld", "alfworld"]
    assert [r["task_id"] for r in rows] == ["fixture-0", "fixture-1", "fixture-0", "fixture-1"]


def write_bad(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "no_rating.tsv",
            "prompt\tresponse\nx\ty\n",
            r"missing column\(s\) \['rating'\]; the file has \['prompt', 'res",
        ),
        ("no_prompt.csv", "q,response,rating\nx,y,1\n", r"missing column\(s\) \['prompt or query'\]"),
        (
            "word.tsv",
            "prompt\tresponse\trating\nx\ty\t1\nx\tz\tgood\n",
            r"line 3: rating 'good' in column 'rating' is "
            r"not a finite number",
        ),
        ("nan.jsonl", '{"prompt": "x", "response": "y", "rating": "nan"}\n', r"line 1: rating 'nan' .* not a finite"),
        (
            "latin1.tsv",
            "prompt\tresponse\trating\ncaf\xe9\ty\t1\n".encode("latin-1"),
            r"not utf-8 text .* "
            r"--encoding latin-1",
        ),
        ("broken.jsonl", '{"prompt": "x"\n', r"line 1 is not JSON"),
        ("table.xlsx", "x", r"cannot tell the format from the file name"),
        ("header_only.csv", "prompt,response,rating\n", r"no rows"),
        ("fake.parquet", "not parquet", r"not a readable Parquet file"),
    ],
)
def test_import_ratings_bad_files_fail_with_one_line(tmp_path, capsys, name, content, message):
    path = write_bad(tmp_path, name, content)
    with pytest.raises(DataError, match=message):
        import_ratings(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert cli_main(["import-ratings", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def test_import_ratings_reads_another_encoding_when_told(tmp_path):
    path = write_bad(
        tmp_path, "latin1.tsv", "prompt\tresponse\trating\ncaf\xe9?\tNext time ask.\t1\n".encode("latin-1")
    )
    import_ratings(path, tmp_path / "out", encoding="latin-1")
    assert load(tmp_path / "out")[0]["prompt"] == "caf\xe9?"


def test_import_ratings_refuses_to_overwrite_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a saved dataset"):
        import_ratings(FIXTURES / "ratings.jsonl", tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_import_ratings_dataset_trains_sft_and_the_reward_model(tmp_path, tiny_models):  # noqa: F811
    data = str(tmp_path / "imported")
    import_ratings(FIXTURES / "original_style.tsv", data)
    common = ["--dataset", data, "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--max_length", "96",
              "--per_device_train_batch_size", "2"]  # fmt: skip
    sft = load_script("sft_run").main(["--model", tiny_models["lm"], "--output_dir", str(tmp_path / "sft"), *common])
    assert sft["sft/num_examples"] == 2  # ratings 1 and 0.5 pass min_rating 0
    assert sft["sft/imported/num_examples"] == 2
    # Rows without task ids are held out by prompt: no prompt on both sides.
    rm = load_script("reward_run").main(["--model", tiny_models["rm"], "--output_dir", str(tmp_path / "rm"), "--mode",
                                         "regression", "--eval_fraction", "0.25", *common])  # fmt: skip
    assert rm["reward/num_train_rows"] == 3 and rm["reward/eval_num_rows"] == 1


def test_import_ratings_dataset_trains_ppo_with_the_reward_model(tmp_path, tiny_models):  # noqa: F811
    data = str(tmp_path / "imported")
    import_ratings(FIXTURES / "ratings.jsonl", data)
    rm = tmp_path / "rm"
    shutil.copytree(tiny_models["rm"], rm)
    metrics = load_script("ppo_run").main(ppo_argv(tiny_models, tmp_path, data, "--reward_model", str(rm)))
    assert metrics["ppo/iterations"] == 1
    assert "ppo/imported/reward_mean" in metrics


def ppo_argv(tiny_models, tmp_path, data: str, *extra: str) -> list[str]:  # noqa: F811
    return ["--model", tiny_models["lm"], "--dataset", data, "--output_dir", str(tmp_path / "ppo"), "--num_iterations",
            "1", "--batch_size", "2", "--num_samples_per_prompt", "2", "--minibatch_size", "2", "--ppo_epochs", "1",
            "--max_new_tokens", "4", "--max_prompt_length", "48", "--lora.target_modules", "q_proj,v_proj",
            *extra]  # fmt: skip


def test_import_ratings_rows_are_refused_by_the_environment_reward(tmp_path, tiny_models):  # noqa: F811
    data = str(tmp_path / "imported")
    import_ratings(FIXTURES / "ratings.jsonl", data)
    (tmp_path / "run").mkdir()
    main = load_script("ppo_run").main
    with pytest.raises(DataError, match=r"4 of 4 prompts .* have no task id.*reward_source=env re-runs the task's "
                       r"next attempt .* Train on them with reward_source rm"):  # fmt: skip
        main(ppo_argv(tiny_models, tmp_path, data, "--reward_source", "env", "--env_run_dir", str(tmp_path / "run")))
    assert not (tmp_path / "ppo").exists()  # refused before training started
