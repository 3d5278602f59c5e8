"""Config dataclasses <-> dicts <-> YAML/JSON files <-> command-line flags, written once.

Every verb that takes a config (``train``, ``lm train``, ``translate train``,
``train-tokenizer``, ``study``) describes it as a plain dataclass and goes through here:

    values = read_config_file("exp.yaml")          # ConfigError names file:line on a syntax error
    cfg = from_dict(TrainConfig, values)           # unknown keys: "did you mean", valid keys listed
    add_arguments(parser, TrainConfig)             # one --flag per field, unset flags stay absent
    cfg = config_from_args(TrainConfig, args)      # --config file first, then the flags that were set

A dataclass that derives from :class:`Config` gets the same as methods
(``TrainConfig.from_file(path, lr=0.1)``, ``cfg.save(path)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

from .errors import ConfigError, MissingFileError

__all__ = [
    "Config",
    "add_arguments",
    "check_values",
    "config_from_args",
    "from_dict",
    "from_file",
    "given_values",
    "read_config_file",
    "save",
    "to_dict",
]

_NONE_WORDS = ("none", "null")


# ------------------------------------------------------------------------------- files
def read_config_file(path: str | Path) -> dict:
    """A YAML (``.yaml``/``.yml``) or JSON file as a dict; errors name the file and the line."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: JSON syntax error: {e.msg}") from None
    else:  # YAML is a superset of JSON, so any other suffix is read as YAML
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys to values (key: value), "
            f"got a {type(values).__name__}"
        )
    return values


# ------------------------------------------------------------------------------- dict <-> dataclass
def from_dict(cls, values: dict, *, source: str | None = None):
    """Build ``cls`` from ``values``: unknown keys are named with the valid ones, types are checked.

    Ints are accepted for float fields; nested dataclass fields (and lists of them) are built
    from dicts. ``source`` (a file name) prefixes the messages.
    """
    where = f"{source}: " if source else ""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}a {cls.__name__} needs a mapping of keys to values, got {values!r}")
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in values if k not in known]
    if unknown:
        hints_text = "".join(
            f" ({k!r}: did you mean {m[0]!r}?)"
            for k in unknown
            if (m := difflib.get_close_matches(str(k), known, n=1, cutoff=0.6))
        )
        raise ConfigError(
            f"{where}unknown config keys {sorted(map(str, unknown))}{hints_text}; "
            f"valid keys: {', '.join(sorted(known))}"
        )
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [k for k in required if k not in values]
    if missing:
        raise ConfigError(f"{where}{cls.__name__} needs {', '.join(missing)}; got only {sorted(values)}")
    checked = {k: _check(cls.__name__, k, v, hints[k], where) for k, v in values.items()}
    try:
        return cls(**checked)
    except ConfigError as e:  # __post_init__: an impossible value
        raise ConfigError(f"{where}{e}") from None


def check_values(cls, values: dict, *, what: str | None = None) -> dict:
    """``values`` (some fields of the dataclass ``cls``) checked against its annotations, as
    :func:`from_dict` does; for arguments that are not built here (``model_args``)."""
    try:
        hints = _hints(cls)
    except Exception:  # annotations this module cannot resolve: leave the checks to the class
        return dict(values)
    where = f"{what}: " if what else ""
    return {k: _check(cls.__name__, k, v, hints[k], where) if k in hints else v for k, v in values.items()}


def from_file(cls, path: str | Path, **overrides):
    """``cls`` from a YAML/JSON file; ``overrides`` (e.g. command-line flags) win."""
    return from_dict(cls, {**read_config_file(path), **overrides}, source=str(path))


def to_dict(cfg) -> dict:
    """Plain, JSON-serialisable values (nested dataclasses become dicts)."""
    return dataclasses.asdict(cfg)


def save(cfg, path: str | Path) -> None:
    """Write ``cfg`` as JSON, or YAML when ``path`` ends in ``.yaml``/``.yml``."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        plain = json.loads(json.dumps(to_dict(cfg)))  # tuples -> lists: safe_dump takes plain types only
        path.write_text(yaml.safe_dump(plain, sort_keys=False), encoding="utf-8")
    else:
        path.write_text(json.dumps(to_dict(cfg), indent=2) + "\n", encoding="utf-8")


class Config:
    """Mixin for config dataclasses: ``from_dict``, ``from_file``, ``to_dict``, ``save``."""

    @classmethod
    def from_dict(cls, values: dict, *, source: str | None = None):
        return from_dict(cls, values, source=source)

    @classmethod
    def from_file(cls, path: str | Path, **overrides):
        return from_file(cls, path, **overrides)

    def to_dict(self) -> dict:
        return to_dict(self)

    def save(self, path: str | Path) -> None:
        save(self, path)


# ------------------------------------------------------------------------------- type checks
def _hints(cls) -> dict[str, Any]:
    # The annotations are strings (``from __future__ import annotations``); resolve them once.
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``int`` -> (int, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else tp), optional  # X | Y: not checked further
    return tp, False


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(owner: str, key: str, value, tp, where: str = ""):
    """``value`` if it fits the annotation ``tp`` (ints widen to float), else a ConfigError."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional or base is Any:
            return None
        raise ConfigError(f"{where}{key} cannot be empty (null); give a {_type_name(base)}")
    origin = typing.get_origin(base) or base
    name = _type_name(base)
    article = "an" if name[:1] in "aeiou" else "a"
    bad = ConfigError(f"{where}{key} must be {article} {name}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(base):
        return value if isinstance(value, base) else from_dict(base, value, source=where.rstrip(": ") or None)
    if base is bool:
        if not isinstance(value, bool):
            raise bad
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    elif base is str:
        if not isinstance(value, str):
            raise bad
    elif origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(base)[:1] or (Any,)
        items = [_check(owner, f"{key}[{i}]", v, item, where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    elif origin is dict:
        if not isinstance(value, dict):
            raise bad
    return value


# ------------------------------------------------------------------------------- argparse
def add_arguments(
    parser: argparse.ArgumentParser,
    cls,
    helps: dict[str, str] | None = None,
    *,
    skip: tuple[str, ...] = (),
    choices: dict[str, list] | None = None,
) -> None:
    """One ``--flag`` per field (``--max-steps`` for ``max_steps``), its default in the help.

    bool: ``--flag/--no-flag``; dict and list: JSON (a list of numbers or words may also be
    comma-separated); ``X | None``: the word ``none`` gives None. Unset flags are absent from
    the parsed namespace, so a ``--config`` file's values survive (see :func:`config_from_args`).
    """
    helps, choices = helps or {}, choices or {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        base, optional = _unwrap_optional(hints[f.name])
        shown = json.dumps(default) if isinstance(default, (dict, list)) else default
        text = helps.get(f.name, "")
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _flag_parser(base, optional)
            kw["metavar"] = _metavar(base, optional)
            if f.name in choices:
                kw["choices"], kw["metavar"] = choices[f.name], None
                text = text or "one of " + ", ".join(map(str, choices[f.name]))
        kw["help"] = f"{text} (default: {shown})".strip()
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def _metavar(base, optional: bool) -> str:
    origin = typing.get_origin(base) or base
    name = {int: "N", float: "X", str: "TEXT", dict: "JSON", list: "LIST"}.get(origin, "VALUE")
    return f"{name}|none" if optional else name


def _flag_parser(base, optional: bool):
    """The ``type=`` of a flag: text -> value; argparse turns a ValueError into a one-line usage error."""
    origin = typing.get_origin(base) or base

    def parse(text: str):
        if optional and text.strip().lower() in _NONE_WORDS:
            return None
        if origin is int:
            return int(text)
        if origin is float:
            return float(text)
        if origin is dict:
            value = _json(text)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object such as '{\"key\": 1}'")
            return value
        if origin in (list, tuple):
            if text.lstrip().startswith("["):
                value = _json(text)
            else:  # 0.1,0.5,1.0
                value = [_scalar(x.strip()) for x in text.split(",") if x.strip()]
            (item,) = typing.get_args(base)[:1] or (Any,)
            return [float(v) if item is float and isinstance(v, int) else v for v in value]
        return text

    # argparse names the type in its message: "argument --epochs: invalid int value: 'ten'"
    parse.__name__ = {int: "int", float: "float", dict: "JSON object", list: "list"}.get(origin, "text")
    return parse


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None


def _scalar(text: str):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def given_values(cls, args: argparse.Namespace, *, config_attr: str = "config") -> dict:
    """What the user set for this invocation: the ``--config`` file's values, then the flags
    given on the command line (defaults excluded); checked against ``cls`` like :func:`from_dict`."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    flags = {k: getattr(args, k) for k in names if hasattr(args, k)}
    path = getattr(args, config_attr, None)
    values = {**read_config_file(path), **flags} if path else flags
    from_dict(cls, values, source=str(path) if path else None)  # unknown keys, types, impossible values
    return values


def config_from_args(cls, args: argparse.Namespace, *, config_attr: str = "config"):
    """The ``--config`` file (if any), then every flag that was given on the command line."""
    path = getattr(args, config_attr, None)
    return from_dict(
        cls, given_values(cls, args, config_attr=config_attr), source=str(path) if path else None
    )
