"""Loading a learner config for a deployment: :func:`load_learner_config` (a file, the
``FLEETLOOP_LEARNER_*`` environment and flags; precedence flags > environment > file).

- The file (TOML, YAML or JSON by extension) holds a robot :class:`~learner.config.LearnerConfig`
  or, with ``kind: "llm"``, an :class:`~learner.llm.config.LlmLearnerConfig` (``kind`` may also come
  from the flags or ``FLEETLOOP_LEARNER_KIND``; none = robot).
- The environment (pydantic-settings, :class:`fleetloop.config_files.StrictEnvSource`): prefix
  ``FLEETLOOP_LEARNER_``, nested delimiter ``__`` (``FLEETLOOP_LEARNER_SERVING__PORT``,
  ``FLEETLOOP_LEARNER_OPTIMISATION__BATCH_SIZE``; a whole group as JSON in
  ``FLEETLOOP_LEARNER_SERVING``); list, mapping and model values are JSON. Old flat names
  (``FLEETLOOP_LEARNER_PORT``) still work, their values starting ``[``/``{`` parsed as JSON, and are
  logged once with their new name. Any other ``FLEETLOOP_LEARNER_*`` variable is refused with
  InvalidArgument naming it (pydantic-settings alone would ignore a typo).
- Old flat names in the file (``port``, ``tls_cert_file``, ...) are lifted to their groups and logged
  (``event=config_name_deprecated old=port new=serving.port``); an old and a new name for the same
  setting in one source is an error naming both.
- Sources merge group by group (a nested model's fields from the environment override the file's
  one by one; a list or mapping value replaces the file's whole value).

Errors are InvalidArgument naming where the bad value came from (the file, the variable, or the flag)
and the field. :class:`~learner.config.LearnerConfig` itself stays a plain model: building one in
code, or from JSON inside the Ray actor (:func:`learner.process.parse_config`), never reads the
environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fleetloop.config_files import StrictEnvSource, load_data, model_of
from fleetloop.errors import InvalidArgument
from fleetloop.logs import event, get_logger
from learner.config import LearnerConfig, lift_legacy
from learner.llm.config import LlmLearnerConfig

PREFIX, DELIMITER = "FLEETLOOP_LEARNER_", "__"
log = get_logger("learner.settings")


def config_model(kind: object) -> type[LearnerConfig] | type[LlmLearnerConfig]:
    """The config model of a ``kind`` ("llm": :class:`LlmLearnerConfig`; anything else, or none, robot)."""
    return LlmLearnerConfig if kind == "llm" else LearnerConfig


def merge(model: type[BaseModel], base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``: a nested model's dicts merge field by field, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        field = model.model_fields.get(key)
        sub = model_of(field.annotation) if field is not None else None
        if sub is not None and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(sub, out[key], value)
        else:
            out[key] = value
    return out


def _lookup(data: Any, path: tuple[Any, ...]) -> bool:
    """Whether ``data`` sets ``path`` (or a prefix of it holding a whole value)."""
    for part in path:
        if not isinstance(data, dict):
            return True
        if part not in data:
            return False
        data = data[part]
    return True


def _file_data(path: Path) -> dict[str, Any]:
    try:
        data = load_data(path)
    except Exception as exc:  # unreadable, or not TOML/YAML/JSON (tomllib, json, yaml errors)
        raise InvalidArgument(f"{path}: {exc}", field=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: a learner config is a mapping of settings, got {type(data).__name__}",
                              field=str(path))
    return data


class _Env:
    """The ``FLEETLOOP_LEARNER_*`` part of a learner config (module docstring)."""

    def __init__(self, model: type[BaseModel], legacy: dict[str, tuple[str, str]],
                 environ: Mapping[str, str] | None) -> None:
        src = StrictEnvSource(model, environ, extra_names=legacy, env_prefix=PREFIX, env_nested_delimiter=DELIMITER)
        self.origin: dict[tuple[str, ...], str] = {}  # field path -> the variable that set it
        self.legacy_vars: dict[str, str] = {}  # old variable -> its new name
        for var, rest in src.variables.items():
            path = src.path_of(var)
            if path is None:  # an old flat name
                path = legacy[rest]
                self.legacy_vars[var] = PREFIX + DELIMITER.join(path).upper()
            self.origin[tuple(path)] = var
        for old, new in self.legacy_vars.items():
            p = legacy[src.variables[old]]
            clash = [v for q, v in self.origin.items() if v != old and q[:len(p)] == p]
            if clash:
                raise InvalidArgument(f"environment variables {old} and {clash[0]} set the same setting "
                                      f"{'.'.join(p)} (old and new name): set only {new}", field=old)
        try:
            self.data = lift_legacy({**src(), **src.extra_values()}, legacy)
        except ValueError as exc:
            raise InvalidArgument(f"environment ({', '.join(self.legacy_vars)}): {exc}") from None

    def variable(self, loc: tuple[Any, ...]) -> str | None:
        """The variable that set ``loc`` (or the group holding it)."""
        hits = [(len(p), v) for p, v in self.origin.items() if tuple(loc[:len(p)]) == p]
        return max(hits)[1] if hits else None


def load_learner_config(path: Path | str | None, flags: Mapping[str, Any] | None = None,
                        environ: Mapping[str, str] | None = None) -> LearnerConfig | LlmLearnerConfig:
    """The learner config of a deployment (module docstring): ``path`` (or None: defaults), then the
    environment (``environ``, default ``os.environ``), then ``flags`` (nested or old flat names, e.g.
    ``{"serving": {"port": 7001}}``). Raises InvalidArgument naming the source and the field."""
    flags = dict(flags or {})
    file_data = _file_data(Path(path)) if path is not None else {}
    env_kind = next((v for k, v in (os.environ if environ is None else environ).items()
                     if k.upper() == PREFIX + "KIND"), None)
    model = config_model(flags.get("kind", env_kind if env_kind is not None else file_data.get("kind")))
    legacy = model.legacy_names
    renamed: dict[str, str] = {}
    try:
        file_part = lift_legacy(file_data, legacy, renamed=renamed)
    except ValueError as exc:
        raise InvalidArgument(f"{path}: {exc}", field=str(path)) from None
    env = _Env(model, legacy, environ)
    try:
        flag_part = lift_legacy(flags, legacy)
    except ValueError as exc:
        raise InvalidArgument(f"flags: {exc}") from None
    for old, new in renamed.items():
        event(log, "config_name_deprecated", level=30, old=old, new=new, source=str(path))
    for old, new in env.legacy_vars.items():
        event(log, "config_name_deprecated", level=30, old=old, new=new, source="environment")
    merged = merge(model, merge(model, file_part, env.data), flag_part)
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise _invalid(exc, path, renamed, env, flag_part) from None


def _invalid(exc: ValidationError, path: Path | str | None, renamed: dict[str, str], env: _Env,
             flag_part: dict[str, Any]) -> InvalidArgument:
    """InvalidArgument for the first error, naming the source that gave the bad value and the field."""
    first = exc.errors()[0]
    loc = tuple(first["loc"])
    field = ".".join(str(p) for p in loc)
    got = f" (got {first.get('input')!r})" if loc else ""
    msg = str(first["msg"]).removeprefix("Value error, ")
    var = env.variable(loc) if loc else None
    if loc and _lookup(flag_part, loc):
        where = "flag"
    elif var is not None:
        where = var
    elif loc and path is not None:
        old = [o for o, n in renamed.items() if field == n or field.startswith(n + ".")]
        where = f"{path}" + (f" ({old[0]} is now {renamed[old[0]]})" if old else "")
    else:  # a rule across fields (loc ()): name every source that contributed
        sources = ([str(path)] if path is not None else []) + sorted(env.origin.values()) + (["flags"] if flag_part else [])
        where = "learner config" + (f" ({' + '.join(sources)})" if sources else "")
    return InvalidArgument(f"{where}: {field + ': ' if field else ''}{msg}{got}", field=field or None,
                           value=first.get("input"))
