"""Pydantic configs from files and the environment.

- :func:`load_data`: the parsed content of a TOML, YAML or JSON file (by extension).
- :class:`StrictEnvSource`: the pydantic-settings environment source (``PREFIX<FIELD>``, nested
  ``PREFIX<GROUP>__<FIELD>`` with a delimiter, values of list/mapping/model fields parsed as JSON)
  over any mapping (``os.environ`` by default), which also refuses unknown ``PREFIX*`` names with an
  error naming the variable: pydantic-settings alone ignores them, and a typo must not be silently
  ignored. Used by :func:`learner.settings.load_learner_config` (``FLEETLOOP_LEARNER_``) and the
  Kubernetes launcher's ``KubeSettings`` (``FLEETLOOP_K8S_``).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_settings import EnvSettingsSource, SettingsError
from pydantic_settings.sources.utils import parse_env_vars

from fleetloop.errors import InvalidArgument


def load_data(path: str | Path) -> object:
    """The parsed content of a TOML, YAML or JSON file (by extension; anything else is JSON)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml
        return yaml.safe_load(text)
    return json.loads(text)


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model of a field's annotation (``M`` or ``M | None``), else None."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _is_mapping(annotation: Any) -> bool:
    return any(t is dict or typing.get_origin(t) is dict for t in (annotation, *typing.get_args(annotation)))


def env_path(model: type[BaseModel], name: str, delimiter: str | None) -> tuple[str, ...] | None:
    """The field path of env name ``name`` (prefix removed, lower case; ``serving__port`` ->
    ``("serving", "port")``), or None when it names no field of ``model``. Parts past a mapping field
    are its keys."""
    parts = name.split(delimiter) if delimiter else [name]
    cur: type[BaseModel] | None = model
    for i, part in enumerate(parts):
        if cur is None or part not in cur.model_fields:
            return None
        annotation = cur.model_fields[part].annotation
        if i < len(parts) - 1 and _is_mapping(annotation) and model_of(annotation) is None:
            return tuple(parts)
        cur = model_of(annotation)
    return tuple(parts)


def env_names(model: type[BaseModel], prefix: str, delimiter: str | None) -> list[str]:
    """Every env name of ``model``'s fields (``PREFIX<FIELD>``, and with a delimiter the nested ones)."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name.upper())
        sub = model_of(field.annotation)
        if delimiter and sub is not None:
            out += env_names(sub, prefix + name.upper() + delimiter, delimiter)
    return out


class StrictEnvSource(EnvSettingsSource):
    """pydantic-settings' env source over ``environ`` (module docstring) that refuses unknown names.

    ``extra_names`` (lower case, prefix removed) are accepted too without being fields (e.g. old flat
    names a caller lifts itself): :meth:`extra_values` returns them, values starting ``[`` or ``{``
    parsed as JSON. Settings (prefix, delimiter) come from the keyword arguments or the model's
    ``model_config``, as for any pydantic-settings source.
    """

    def __init__(self, settings_cls: type[BaseModel], environ: Mapping[str, str] | None = None,
                 extra_names: Iterable[str] = (), **kwargs: Any) -> None:
        self._environ = os.environ if environ is None else environ
        super().__init__(settings_cls, **kwargs)  # type: ignore[arg-type]
        self._extra = {n.lower() for n in extra_names}
        plen = len(self.env_prefix)
        #: every ``PREFIX*`` variable present: its name -> the rest of it (lower case)
        self.variables = {k: k[plen:].lower() for k in self._environ if k.lower().startswith(self.env_prefix.lower())}
        for var, rest in self.variables.items():
            if rest not in self._extra and env_path(settings_cls, rest, self.env_nested_delimiter) is None:
                raise InvalidArgument(self._unknown(var), field=var, value=self._environ[var])

    def _unknown(self, var: str) -> str:
        import difflib
        known = env_names(self.settings_cls, self.env_prefix.upper(), self.env_nested_delimiter)
        known += [self.env_prefix.upper() + n.upper() for n in sorted(self._extra)]
        close = difflib.get_close_matches(var.upper(), known, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return (f"environment variable {var} is not a {self.settings_cls.__name__} setting{hint}; known: "
                f"{', '.join(known)}")

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    def path_of(self, var: str) -> tuple[str, ...] | None:
        """The field path a present variable sets (None for an extra name)."""
        return env_path(self.settings_cls, self.variables[var], self.env_nested_delimiter)

    def __call__(self) -> dict[str, Any]:
        try:
            return super().__call__()
        except SettingsError as exc:
            m = re.search(r'field "([^"]+)"', str(exc))
            delim = self.env_nested_delimiter
            names = [v for v, rest in self.variables.items()
                     if m and (rest.split(delim)[0] if delim else rest) == m.group(1)]
            raise InvalidArgument(f"environment variable {' or '.join(names) or self.env_prefix + '*'}: {exc} "
                                  f"({exc.__cause__ or 'not valid JSON'})", field=names[0] if names else None) from None

    def extra_values(self) -> dict[str, Any]:
        """The values of the present ``extra_names`` variables, by name (lower case)."""
        out: dict[str, Any] = {}
        for var, rest in self.variables.items():
            if rest in self._extra and env_path(self.settings_cls, rest, self.env_nested_delimiter) is None:
                raw = self._environ[var]
                try:
                    out[rest] = json.loads(raw) if raw[:1] in "[{" else raw
                except ValueError as exc:
                    raise InvalidArgument(f"environment variable {var}: not valid JSON ({exc})", field=var,
                                          value=raw) from None
        return out
