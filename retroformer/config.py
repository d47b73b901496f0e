"""Configuration: documented dataclasses, a YAML recipe per command, CLI overrides, unknown keys rejected.

Every command's config is a (possibly nested) dataclass whose fields carry ``metadata={"help": ...}``. A command is
run as ``--config recipe.yaml`` plus ``--section.field value`` overrides; :func:`make_parser` builds the parser with
one documented flag per leaf field, and :func:`load_config` merges defaults < ``.env`` < YAML < CLI and validates.
Nested sections validate themselves in ``__post_init__`` so bad values fail before any model is loaded.

The library never reads the environment here: secrets are named by config (e.g. ``api_key_env``) and read by the
scripts, which load ``.env``. Values that ``.env`` supplies (``CKPT_DIR``, ``DATA_DIR``, ``OPENAI_MODEL``) reach
:func:`resolve_config` as ``env_defaults`` from the scripts; it reports where each of them came from.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import logging
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from retroformer.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def doc(help_text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation: ``name: int = doc("what it is", 3)``."""
    kwargs: dict[str, Any] = {"metadata": {"help": help_text}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise a ConfigError naming the field."""
    base, optional = _unwrap_optional(tp)
    if optional and isinstance(value, str) and value.lower() in ("null", "none", "~"):
        value = None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: got null, expected a value of type {getattr(base, '__name__', base)}")
    origin = typing.get_origin(base) or (base if base in (dict, list, tuple) else None)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            number = int(value)
            if not -(2**63) <= number < 2**63:
                raise ConfigError(f"{where}: got {number}, which is out of range; expected an integer below 2**63")
            return number
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{where}: got {value!r}, expected a finite number (not nan or inf)")
            return number
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
        if origin is typing.Literal:
            allowed = typing.get_args(base)
            if value not in allowed:
                raise ConfigError(f"{where}: got {value!r}, expected one of {list(allowed)}")
            return value
        if origin in (list, tuple):
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            if not isinstance(value, list):
                raise ValueError(value)
            (item_tp, *_) = typing.get_args(base) or (Any,)
            items = [_coerce(v, item_tp, f"{where}[{i}]") if item_tp is not Any else v for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except ConfigError:
        raise
    except (ValueError, TypeError, yaml.YAMLError):
        raise ConfigError(
            f"{where}: got {value!r}, expected a value of type {getattr(base, '__name__', str(base))}"
        ) from None
    return value


def _reject_unknown_keys(cls: type, data: dict[str, Any], where: str = "") -> None:
    """A ConfigError naming the first key of ``data`` (nested sections included) that ``cls`` has no field for."""
    hints = _resolved_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        prefix = f"{where}." if where else ""
        name, colon, rest = str(key).partition(":")
        if colon and name.strip() in fields and data[key] is None:
            # YAML reads `{num_tasks:20}` as one key 'num_tasks:20' without a value.
            raise ConfigError(
                f"config key {prefix}{key!r} looks like {name.strip()!r} set to {rest.strip()!r} without a space "
                f"after the colon; YAML needs one: {{{name.strip()}: {rest.strip()}}}"
            )
        raise ConfigError(
            f"unknown config key {prefix}{key!r} for {cls.__name__}.{_suggest(key, list(fields))} "
            f"Valid keys: {', '.join(sorted(fields))}"
        )
    for name, value in data.items():
        base, _ = _unwrap_optional(hints[name])
        if _is_dataclass_type(base) and isinstance(value, dict):
            _reject_unknown_keys(base, value, f"{where}.{name}" if where else name)


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with a suggestion."""
    data = dict(data or {})
    hints = _resolved_hints(cls)
    _reject_unknown_keys(cls, data, where)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        path = f"{where}.{name}" if where else name
        base, _ = _unwrap_optional(tp)
        if _is_dataclass_type(base):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{path}: got {value!r}, expected a mapping of {base.__name__} fields")
            kwargs[name] = None if value is None else from_dict(base, value, path)
        else:
            kwargs[name] = _coerce(value, tp, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (for logging and for writing beside a stage's outputs)."""
    return dataclasses.asdict(cfg)


#: The precedence of every command, as written in the header of a saved config.
PRECEDENCE = "command line > YAML recipe > .env > built-in default"


def save_config(cfg: Any, path: str | Path, sources: dict[str, str] | None = None) -> None:
    """Write the resolved config as YAML. Configs hold no secrets: keys are named by ``*_env`` fields only.

    ``sources`` (from :func:`resolve_config`: dotted field -> where its value came from) is written as a comment
    header, so the file still reads back as a recipe.
    """
    header = ""
    if sources:
        lines = [f"# where values came from ({PRECEDENCE}):"]
        lines += [f"#   {name}: {origin}" for name, origin in sources.items()]
        header = "\n".join(lines) + "\n"
    # Through a temporary file and a rename: the shards of a run read and write this file while others run.
    write_atomic(path, header + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_sources(path: str | Path) -> dict[str, str]:
    """The ``sources`` header of a config written by :func:`save_config` (empty when it has none)."""
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        name, sep, origin = line[1:].strip().partition(": ")
        if sep and not name.startswith("where values came from"):
            out[name] = origin
    return out


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    out = []
    hints = _resolved_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        base, _ = _unwrap_optional(tp)
        name = f"{prefix}{f.name}"
        if _is_dataclass_type(base):
            out.extend(_leaf_fields(base, f"{name}."))
        else:
            out.append((name, tp, f))
    return out


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return "(see section)" if dataclasses.is_dataclass(value) else repr(value)
    return "required"


def make_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``--config`` and one documented ``--dotted.name`` flag per leaf field of ``cls``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a prefix such as --kl must not silently set kl_coef
    )
    parser.add_argument("--config", help="YAML recipe; CLI flags override its values", default=None)
    for name, tp, f in _leaf_fields(cls):
        help_text = f.metadata.get("help", "")
        if _is_dict_type(tp):
            help_text += f"; or one key at a time: --{name}.KEY VALUE"
        parser.add_argument(
            f"--{name}",
            dest=f"override__{name}",
            default=argparse.SUPPRESS,
            metavar=getattr(_unwrap_optional(tp)[0], "__name__", "VALUE").upper(),
            help=f"{help_text} (default: {_default_repr(f)})".replace("%", "%%"),
        )
    return parser


def _is_dict_type(tp: Any) -> bool:
    base, _ = _unwrap_optional(tp)
    return base is dict or typing.get_origin(base) is dict


def _scalar(text: str) -> Any:
    """A command-line value for a key inside a mapping: a number, true/false or null as YAML reads it, else the text
    as given (YAML would read e.g. 'no' as false)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text
    return value if value is None or isinstance(value, (bool, int, float, list, dict)) else text


def _nested_overrides(cls: type, rest: list[str]) -> dict[str, Any]:
    """``--section.mapping.KEY VALUE`` (or ``=VALUE``) for a mapping field (e.g. ``--env.options.data_path X``),
    from the arguments the parser did not know; any other unknown argument is a ConfigError with a suggestion."""
    flags = [name for name, _, _ in _leaf_fields(cls)]
    mappings = [name for name, tp, _ in _leaf_fields(cls) if _is_dict_type(tp)]
    out: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        flag, eq, value = rest[i].partition("=")
        key = flag[2:] if flag.startswith("--") else ""
        if not any(key.startswith(f"{m}.") and len(key) > len(m) + 1 for m in mappings):
            bad = rest[i].lstrip("-").split("=")[0]
            raise ConfigError(
                f"unknown option {rest[i]!r}.{_suggest(bad, flags)} Run with --help to list every option."
            )
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise ConfigError(f"option {flag} needs a value: {flag} VALUE")
            i += 1
            value = rest[i]
        out[key] = _scalar(value)
        i += 1
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {}) if isinstance(node.get(part), dict) or part not in node else node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {part!r} is not a section")
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe, with clear errors for a missing file, bad YAML or a non-mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML recipe to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of fields, got {type(data).__name__}")
    return data


def _has_dotted(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_config(cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> T:
    """Parse ``argv`` (``--config`` + overrides) into a validated ``cls``."""
    return resolve_config(cls, argv, prog)[0]


def resolve_config(
    cls: type[T],
    argv: list[str] | None = None,
    prog: str | None = None,
    env_defaults: dict[str, tuple[Any, str]] | Callable[[dict[str, Any]], dict[str, tuple[Any, str]]] | None = None,
    missing_hints: dict[str, str] | None = None,
) -> tuple[T, dict[str, str]]:
    """Parse ``argv`` into a validated ``cls`` with the precedence command line > YAML recipe > .env > default.

    ``env_defaults`` maps a dotted field to ``(value, origin)``, e.g. ``{"output_dir": ("/ckpt/sft", ".env
    CKPT_DIR")}``, or a function of the recipe and command-line values merged (for defaults that depend on them): the
    value is used where neither the command line nor the recipe sets the field (a recipe that writes the key, even as
    null, sets it). Returns the config and, for every field named in ``env_defaults``, where
    its value came from: ``command line``, ``recipe <path>``, the origin given, or ``default``. ``missing_hints``
    (field -> how to supply it) extends the error for a required field that nothing set.
    """
    parser = make_parser(cls, prog=prog, description=cls.__doc__)
    args, rest = parser.parse_known_args(argv)
    nested = _nested_overrides(cls, rest)
    data = read_yaml(args.config) if args.config else {}
    if args.config and not data:
        raise ConfigError(
            f"config file {args.config!r} is empty (it sets no fields); write the run's settings in it (see the "
            "recipes in experiments/), or leave out --config to start from the defaults"
        )
    cli = {key[len("override__") :]: value for key, value in vars(args).items() if key.startswith("override__")}
    cli.update(nested)  # after the mappings they go into
    if callable(env_defaults):
        merged = copy.deepcopy(data)
        for name, value in cli.items():
            _set_dotted(merged, name, value)
        env_defaults = env_defaults(merged)
    sources: dict[str, str] = {}
    for name, (value, origin) in (env_defaults or {}).items():
        if name in cli:
            sources[name] = "command line"
        elif _has_dotted(data, name):
            sources[name] = f"recipe {args.config}"
        elif value is not None:
            _set_dotted(data, name, value)
            sources[name] = origin
        else:
            sources[name] = "default"
    for name, value in cli.items():
        _set_dotted(data, name, value)
    _reject_unknown_keys(cls, data)  # a typo is reported before what is missing
    hints = missing_hints or {}

    def unset(f: dataclasses.Field) -> bool:
        if f.name in data:
            return False
        if f.default is not dataclasses.MISSING:
            return f.name in hints and not f.default  # an empty default that means "required" (e.g. model: "")
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            return f.name in hints and not f.default_factory()  # type: ignore[misc]
        return True

    missing = [f.name for f in dataclasses.fields(cls) if f.init and unset(f)]
    if missing:
        what = "; ".join(
            f"{name}: pass --{name} or set it in the --config recipe{hints.get(name, '')}" for name in missing
        )
        raise ConfigError(f"{prog or cls.__name__}: {', '.join(missing)} not set. {what}")
    return from_dict(cls, data), sources


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """Whether ``path`` reads as a Hub id (``org/name``) rather than a local path."""
    return bool(_HUB_ID_RE.match(path)) and not path.startswith((".", "/", "~"))


def check_model_path(path: str, field_name: str = "model") -> str:
    """Fail fast on a model path that does not exist. Hub ids (``org/name``) are let through unchecked.

    A local directory must hold a ``config.json`` (a full model) or an ``adapter_config.json`` (a PEFT adapter).
    """
    if not path:
        raise ConfigError(f"{field_name} is empty; pass a local model directory or a Hub id like org/name")
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{field_name}={path!r} is a file; pass the model directory (with config.json)")
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise ConfigError(
                f"{field_name}={path!r} holds no config.json or adapter_config.json; pass a directory written by "
                "save_pretrained (e.g. runs/tiny/lm from `retroformer tiny-models --out runs/tiny`)"
            )
        return path
    if is_hub_id(path):
        logger.info("%s=%r is not a local path; treating it as a Hugging Face Hub id", field_name, path)
        return path
    raise ConfigError(
        f"{field_name}={path!r} does not exist; pass an existing model directory (e.g. build tiny ones with "
        "`retroformer tiny-models --out runs/tiny`) or a Hub id like org/name"
    )


def write_atomic(path: str | Path, data: str) -> None:
    """Write ``path`` through a temporary file and a rename: a reader (another shard, another machine) sees the old
    file or the new one, never a part; two writers never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # as a plain write would (mkstemp makes the file private)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
