"""The ``retroformer`` command.

    retroformer trials --config experiments/demo/trials.yaml [--section.field value ...]
    retroformer tiny-models --out runs/tiny
    retroformer report runs/a runs/b --out runs/report
    retroformer webshop-server --host 127.0.0.1 --port 3000

This module is the only place besides the stage scripts that reads ``.env`` and the process environment.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from retroformer.errors import RetroformerError

logger = logging.getLogger("retroformer")

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
    for noisy in ("httpx", "openai", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    from retroformer.config import load_config, to_dict
    from retroformer.report import format_summary
    from retroformer.trials import TrialsConfig, run_trials

    cfg = load_config(TrialsConfig, argv, prog="retroformer trials")
    fill_env_paths(cfg)
    logger.info("config: %s", to_dict(cfg))
    # Each role gets the key named by its own api_key_env, so a key is never sent to another role's server.
    keys = {
        role: api_key_for(section.llm.key_env()) if section.llm.backend == "openai" else None
        for role, section in (("actor", cfg.actor), ("reflector", cfg.reflector))
    }
    result = run_trials(cfg, api_keys=keys)
    print(format_summary(cfg.run_name, result.summary))
    print(
        f"records: {result.run_dir / 'trials' / 'episodes.jsonl'} ({result.new_episodes} new episodes, "
        f"{result.wall_time_s:.1f} s)"
    )
    if result.dataset_path is not None:
        print(f"rated reflections: {result.dataset_path}")
    if result.stopped_by_budget:
        print("stopped early: the token/cost budget was reached; finished episodes are kept")
    if result.stopped_by_errors:
        print(f"error: {result.stopped_by_errors}", file=sys.stderr)
        return 3
    return 0


def fill_env_paths(cfg) -> None:
    """Machine paths named in .env fill environment options the recipe leaves unset."""
    opts = cfg.env.options
    if cfg.env.name == "webshop" and opts.get("url") is None and os.environ.get("WEBSHOP_URL"):
        opts["url"] = os.environ["WEBSHOP_URL"]
    if cfg.env.name == "alfworld" and opts.get("data_path") is None and os.environ.get("ALFWORLD_DATA"):
        opts["data_path"] = os.environ["ALFWORLD_DATA"]
    if (
        cfg.env.name == "hotpotqa"
        and opts.get("data_path") is None
        and opts.get("hub_dataset") is None
        and os.environ.get("HOTPOTQA_DATA")
    ):
        opts["data_path"] = os.environ["HOTPOTQA_DATA"]
    # The environment's name and options are checked first, so that a typo there is reported before model paths (which
    # the trial loop checks next) and before any model loads.
    from retroformer.config import from_dict
    from retroformer.envs.base import get_env_class

    env_class = get_env_class(cfg.env.name)
    if opts:
        from_dict(env_class.Config, opts, where="env.options")


def cmd_tiny_models(argv: list[str]) -> int:
    from retroformer.config import load_config
    from retroformer.tiny import TinyModelConfig, build_tiny_models

    cfg = load_config(TinyModelConfig, argv, prog="retroformer tiny-models")
    paths = build_tiny_models(cfg)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_report(argv: list[str]) -> int:
    from retroformer.report import write_report

    parser = argparse.ArgumentParser(prog="retroformer report", description="Compare trial runs side by side.")
    parser.add_argument("runs", nargs="+", help="run directories written by `retroformer trials` (runs/<name>)")
    parser.add_argument("--out", default="runs/report", help="where report.json, report.md and success.png go")
    args = parser.parse_args(argv)
    out = write_report(args.runs, args.out)
    print(out["text"])
    print(f"report: {out['md']}\njson: {out['json']}\nplot: {out['png']}")
    return 0


COMMANDS = {"trials": cmd_trials, "tiny-models": cmd_tiny_models, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = sorted([*COMMANDS, *EXTERNAL])
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands: " + ", ".join(names))
        return 0
    name, rest = argv[0], argv[1:]
    load_env_file()
    setup_logging()
    try:
        if name in COMMANDS:
            return COMMANDS[name](rest)
        if name in EXTERNAL:
            module, func = EXTERNAL[name].split(":")
            return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except RetroformerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: finished episodes and checkpoints are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    import difflib

    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    print(f"error: unknown command {name!r}.{hint} Commands: {', '.join(names)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
