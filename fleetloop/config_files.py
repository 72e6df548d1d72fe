"""Load pydantic configs from TOML, YAML or JSON files (errors name the file and field)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from fleetloop.errors import InvalidArgument

M = TypeVar("M", bound=BaseModel)


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


def load_config(model: type[M], path: str | Path, data: object = None) -> M:
    """Parse ``path`` by extension (or take its already parsed ``data``) and validate it as ``model``."""
    path = Path(path)
    if data is None:
        data = load_data(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidArgument(f"{path}: {field}: {first['msg']} (got {first.get('input')!r})", field=field,
                              value=first.get("input")) from None


def env_overrides(model: type[BaseModel], prefix: str, environ: dict[str, str] | None = None) -> dict[str, object]:
    """Field values from ``PREFIX<FIELD>`` environment variables (e.g. ``FLEETLOOP_LEARNER_PORT``).

    A value starting with ``[`` or ``{`` is parsed as JSON (lists, mappings); anything else is
    passed as a string for pydantic to coerce. Unknown variables with the prefix are an error that
    names them (a typo must not be silently ignored).
    """
    import os
    env = os.environ if environ is None else environ
    fields = {name.upper(): name for name in model.model_fields}
    out: dict[str, object] = {}
    for key, raw in env.items():
        if not key.startswith(prefix):
            continue
        name = fields.get(key[len(prefix):])
        if name is None:
            raise InvalidArgument(f"environment variable {key} is not a {model.__name__} field (known: "
                                  f"{', '.join(prefix + f for f in sorted(fields))})", field=key, value=raw)
        out[name] = json.loads(raw) if raw[:1] in "[{" else raw
    return out
