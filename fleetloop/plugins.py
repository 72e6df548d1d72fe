"""Plug-ins named ``"module:function"`` (policy factories, reward functions, ...).

:func:`import_callable` is the one place such a name is imported: a malformed name, a module or
attribute that cannot be imported, or a value that is not callable raises InvalidArgument naming the
caller's field and the value. Importing runs the module's top-level code: names come from job
configs, which only operators write.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from fleetloop.errors import InvalidArgument


def import_callable(spec: str, *, field: str, what: str) -> Callable[..., Any]:
    """Import ``spec`` (``"module:function"``); ``what`` names it in messages ("policy factory", "reward")."""
    if ":" not in spec:
        raise InvalidArgument(f"{what} {spec!r} must look like 'module:function'", field=field, value=spec)
    module_name, func_name = spec.split(":", 1)
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgument(f"{what} {spec!r} not importable: {exc}", field=field, value=spec) from exc
    if not callable(func):
        raise InvalidArgument(f"{what} {spec!r} is not callable", field=field, value=spec)
    return func
