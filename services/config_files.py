"""Load pydantic configs from TOML, YAML or JSON files (errors name the file and field)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from fleetloop.errors import InvalidArgument

M = TypeVar("M", bound=BaseModel)


def load_config(model: type[M], path: str | Path) -> M:
    """Parse ``path`` by extension and validate it as ``model``."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidArgument(f"{path}: {field}: {first['msg']} (got {first.get('input')!r})", field=field,
                              value=first.get("input")) from None
