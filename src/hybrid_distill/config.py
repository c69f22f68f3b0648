"""The one configuration system: typed dataclasses, validated at creation, loaded from mappings, YAML or
JSON, and turned into command-line flags.

A config is a dataclass deriving from `Config` whose fields are declared with `setting`::

    @dataclass
    class DataConfig(Config):
        source: str = setting("default", check=non_empty_str, help="dataset, file, folder or 'default'")
        max_tokens: int | None = setting(None, check=optional(integer(1)), help="cap on tokens read")

Every value goes through its field's check at creation (a check returns the value, coerced where YAML or numpy
handed over another type, or raises `Invalid`), then through the class's `validate` for rules that span
fields. Errors are `ConfigError`s naming the field by its full path: ``DistillConfig.tau must be ...`` for a
config made on its own, ``stage1.tau must be ...`` for one inside a `RunConfig`. Fields whose type is
another `Config` are built from mappings, so a tree of configs loads from one YAML file.

`add_flags` derives one command-line option per field (``--field-name``) and `flag_values` reads back only
the options given, so a flag left out never overrides a value from a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from .errors import HybridDistillError

C = TypeVar("C", bound="Config")


class ConfigError(HybridDistillError, ValueError):
    """A bad setting. ``where`` is the field's path (``["stage1", "tau"]``), ``reason`` what is wrong."""

    def __init__(self, message: str, where: Sequence[str] = (), reason: str | None = None):
        super().__init__(message)
        self.where = list(where)
        self.reason = reason

    def relocated(self, where: Sequence[str]) -> ConfigError:
        """The same error for a field found under ``where`` (a nested config's class name is dropped)."""
        if self.reason is None:
            return ConfigError(f"{'.'.join(where)}: {self}", where)
        path = [*where, *self.where[1:]]
        return ConfigError(f"{'.'.join(path)} {self.reason}", path, self.reason)


class Invalid(Exception):
    """Raised by a field check: ``message`` completes the sentence '<field> ...' (e.g. 'must be >= 1');
    ``show_value=False`` when the message already quotes the bad value."""

    def __init__(self, message: str, show_value: bool = True):
        super().__init__(message)
        self.show_value = show_value


# ----------------------------------------------------------------------------------------------
# Field checks: each takes the value and returns it (possibly coerced) or raises Invalid.

Check = Callable[[Any], Any]


def _number(value: Any) -> float | int | None:
    """``value`` as a Python number: numpy numbers and numeric strings (PyYAML reads ``1e-3`` as text) too."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        for parse in (int, float):  # int first: exact for large integers
            try:
                return parse(value.strip().replace("_", ""))
            except ValueError:
                pass
    return None


def integer(minimum: int | None = None) -> Check:
    """An int (integral floats and numeric strings such as ``"1e6"`` accepted) of at least ``minimum``."""

    def check(value: Any) -> int:
        number = _number(value)
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            number = int(number)
        if not isinstance(number, int):
            raise Invalid("must be an integer")
        if minimum is not None and number < minimum:
            raise Invalid(f"must be >= {minimum}")
        return number

    return check


def real(minimum: float | None = None, *, exclusive: bool = False, maximum: float | None = None,
         below: float | None = None) -> Check:
    """A finite float in the given range (``exclusive``: strictly above ``minimum``; ``below``: strictly under)."""

    def check(value: Any) -> float:
        number = _number(value)
        if number is None or not math.isfinite(number):
            raise Invalid("must be a finite number")
        number = float(number)
        if minimum is not None and (number < minimum or (exclusive and number == minimum)):
            raise Invalid(f"must be {'>' if exclusive else '>='} {minimum:g}")
        if maximum is not None and number > maximum:
            raise Invalid(f"must be <= {maximum:g}")
        if below is not None and number >= below:
            raise Invalid(f"must be < {below:g}")
        return number

    return check


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> Any:
        if value not in choices:
            raise Invalid(f"must be one of {list(choices)}")
        return value

    check.choices = choices  # type: ignore[attr-defined]  (read by add_flags)
    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("must be true or false")
    return value


def non_empty_str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid("must be a non-empty string")
    return value


def optional(check: Check) -> Check:
    """``None`` or what ``check`` accepts."""

    def wrapped(value: Any) -> Any:
        return None if value is None else check(value)

    for attr in ("choices",):
        if hasattr(check, attr):
            setattr(wrapped, attr, getattr(check, attr))
    return wrapped


def list_of(check: Check, *, min_len: int = 1, what: str = "values") -> Check:
    """A list (tuples accepted) of at least ``min_len`` items, each passing ``check``."""

    def wrapped(value: Any) -> list:
        if not isinstance(value, (list, tuple)) or len(value) < min_len:
            raise Invalid(f"must be a list of {min_len} or more {what}")
        out = []
        for item in value:
            try:
                out.append(check(item))
            except Invalid as err:
                raise Invalid(f"must be a list of {what}; {item!r} {err}") from None
        return out

    return wrapped


def mapping(value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise Invalid("must be a mapping")
    return dict(value)


# ----------------------------------------------------------------------------------------------
# Declaring fields


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, check: Check | None = None,
            help: str = "", flag: bool | str = True, parse: Callable[[str], Any] | None = None,
            metavar: str | None = None, nargs: int | str | None = None) -> Any:
    """A config field: its default, its check, its help text and how the command line sets it.

    ``flag``: True for ``--field-name``, a string for another option name, False for no option.
    ``parse``: how the option's text becomes a value (default: from the field's type); ``nargs``: words the
    option takes (argparse's meaning; each word goes through ``parse``).
    """
    meta = {"check": check, "help": help, "flag": flag, "parse": parse, "metavar": metavar, "nargs": nargs}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _union_members(annotation: Any) -> tuple[Any, ...]:
    """``(X, Y)`` for ``X | Y`` (and ``Optional``), else ``(annotation,)``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _nested_type(annotation: Any) -> type[Config] | None:
    """The `Config` subclass a field holds (``X`` or ``X | None``), else None."""
    for c in _union_members(annotation):
        if isinstance(c, type) and issubclass(c, Config):
            return c
    return None


# ----------------------------------------------------------------------------------------------
# The base class


class Config:
    """Base of every config dataclass: checks at creation, loading, saving and replacing.

    ``error_root``: how errors name a config made on its own (default: the class name); a config built as a
    field of another is named by that field's path instead.
    """

    error_root: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            nested = _nested_type(hints.get(f.name))
            if nested is not None and not isinstance(value, nested) and value is not None:
                try:
                    value = nested.from_dict(value)
                except ConfigError as err:
                    raise err.relocated([*self._root(), f.name]) from None
                object.__setattr__(self, f.name, value)
                continue
            check = f.metadata.get("check")
            if check is None:
                continue
            try:
                object.__setattr__(self, f.name, check(value))
            except Invalid as err:
                raise self.invalid(f.name, str(err), show_value=err.show_value) from None
        self.validate()

    @classmethod
    def _root(cls) -> list[str]:
        root = cls.error_root if cls.error_root is not None else cls.__name__
        return [root] if root else []

    def invalid(self, name: str, reason: str, show_value: bool = True) -> ConfigError:
        """The `ConfigError` for field ``name`` (its value appended) — for rules in `validate`."""
        text = f"{reason}, got {getattr(self, name, None)!r}" if show_value else reason
        where = [*self._root(), *name.split(".")]
        return ConfigError(f"{'.'.join(where)} {text}", where, text)

    def validate(self) -> None:
        """Rules that span fields; raise ``self.invalid(field, reason)``."""

    # -- loading and saving --------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | None) -> C:
        """Build from a mapping of fields; unknown keys are an error naming them."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            root = ".".join(cls._root()) or "the config"
            reason = f"must be a mapping of its fields {cls.field_names()}, got {data!r}"
            raise ConfigError(f"{root} {reason}", cls._root(), reason)
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            root = ".".join(cls._root())
            reason = f"has unknown field(s) {unknown}; valid fields: {cls.field_names()}"
            raise ConfigError(f"Unknown {root + ' ' if root else ''}field(s) {unknown}; valid fields: {cls.field_names()}",
                              cls._root(), reason)
        return cls(**dict(data))  # type: ignore[call-arg]

    @classmethod
    def from_file(cls: type[C], path: str | Path, **overrides: Any) -> C:
        """Load a YAML or JSON file of fields; ``overrides`` (e.g. command-line flags) replace its values."""
        return cls.from_dict({**read_config_file(path, cls), **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain data (nested configs as mappings, tuples as lists), JSON- and YAML-ready."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` (checked like a new config)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_config_file(path: str | Path, cls: type[Config] | None = None) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{path} is not valid YAML ({where}{problem})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        what = f"{cls.__name__} fields" if cls is not None else "settings"
        raise ConfigError(f"{path} must hold a mapping of {what}, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------
# Command-line flags from fields


def parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None


def parse_int(text: str) -> int:
    try:
        return integer()(text)
    except Invalid:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def parse_float(text: str) -> float:
    try:
        return real()(text)
    except Invalid:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def comma_list(item: Callable[[str], Any]) -> Callable[[str], list]:
    """Parser of ``a,b,c`` into a list of ``item(a), ...``."""

    def parse(text: str) -> list:
        return [item(part.strip()) for part in str(text).split(",") if part.strip()]

    return parse


def _parser_for(annotation: Any) -> Callable[[str], Any]:
    base = [a for a in _union_members(annotation) if a is not type(None)]
    kinds = {typing.get_origin(a) or a for a in base}
    if bool in kinds:
        return parse_bool
    if kinds & {dict, Mapping}:
        return parse_json
    if kinds & {list, tuple}:
        inner = [t for a in base for t in typing.get_args(a) if t is not Ellipsis]
        return comma_list(parse_int if int in inner and float not in inner else parse_float if float in inner else str)
    if int in kinds and float not in kinds:
        return parse_int
    if float in kinds:
        return parse_float
    return str


def flag_name(f: dataclasses.Field) -> str | None:
    """The option that sets field ``f`` (None: no option)."""
    spec = f.metadata.get("flag", True)
    if spec is False:
        return None
    return spec if isinstance(spec, str) else "--" + f.name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser | Any, cls: type[Config], *, prefix: str = "", title: str | None = None,
              exclude: Sequence[str] = (), defaults: Mapping[str, Any] | None = None,
              aliases: Mapping[str, Sequence[str]] | None = None) -> None:
    """One option per field of ``cls`` (dest ``prefix + field``), default SUPPRESS: an option not given is
    absent from the parsed namespace, so it never replaces a value from a file. ``defaults`` only changes
    the help text (e.g. a stage's own default); ``aliases``: more option names for a field."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title or f"{cls.__name__} fields")
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = flag_name(f)
        if name is None or f.name in exclude or _nested_type(hints.get(f.name)) is not None:
            continue
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS,
                              "type": f.metadata.get("parse") or _parser_for(hints.get(f.name)),
                              "help": ((f.metadata.get("help") or f.name.replace("_", " "))
                                       + ("" if default is None else f" (default: {default})")).replace("%", "%%")}
        if kw["type"] is parse_bool and f.metadata.get("nargs") is None:
            kw.update(nargs="?", const=True, metavar="BOOL")  # ``--flag`` alone means true
        choices = getattr(f.metadata.get("check"), "choices", None)
        if choices and kw["type"] is str:
            kw["choices"] = list(choices)
        for key in ("metavar", "nargs"):
            if f.metadata.get(key) is not None:
                kw[key] = f.metadata[key]
        group.add_argument(name, *(aliases or {}).get(f.name, ()), **kw)


def flag_values(ns: argparse.Namespace | Mapping[str, Any], cls: type[Config], *, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (options added by `add_flags` with ``prefix``)."""
    values = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns)
    out = {}
    for name in cls.field_names():
        if prefix + name in values and values[prefix + name] is not None:
            out[name] = values[prefix + name]
    return out


__all__ = [
    "Config",
    "ConfigError",
    "Invalid",
    "add_flags",
    "boolean",
    "comma_list",
    "flag_values",
    "integer",
    "list_of",
    "mapping",
    "non_empty_str",
    "one_of",
    "optional",
    "parse_bool",
    "parse_float",
    "parse_int",
    "parse_json",
    "read_config_file",
    "real",
    "setting",
]
