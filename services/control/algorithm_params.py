"""``JobSpec.algorithm_params``: its published JSON schema and its validation.

The request body is unchanged: ``algorithm_params`` is a JSON object, checked against the
``Config`` (a pydantic model) of the job's ``algorithm`` (``learner.algorithms.ALGORITHMS``).
What this module adds:

- :class:`AlgorithmParamsSchema`, an annotation that publishes (OpenAPI / JSON schema only; it
  validates nothing) the object as ``anyOf`` the registered algorithms' Config schemas, each
  ``$ref``'d into the document's components and described with the ``algorithm`` it applies to;
- :func:`check_algorithm_params`, which validates the params and re-raises every problem at its
  full path (``algorithm_params.<field>``) so API clients see ``loc = ["body",
  "algorithm_params", "beta_typo"]`` instead of an error on the whole body.
"""

from __future__ import annotations

from typing import Any

from pydantic import GetJsonSchemaHandler, ValidationError
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema


def _algorithms() -> dict[str, Any]:
    from learner.algorithms import ALGORITHMS
    return dict(sorted(ALGORITHMS.items()))


class AlgorithmParamsSchema:
    """JSON-schema-only annotation of ``algorithm_params`` (see the module docstring)."""

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        generator = getattr(handler, "generate_json_schema", None)  # pydantic's generator: a $ref into the definitions
        variants = []
        for name, cls in _algorithms().items():
            config_schema = cls.Config.__pydantic_core_schema__
            ref = generator.generate_inner(config_schema) if generator is not None else handler(config_schema)
            variants.append({**ref, "description": f"`algorithm_params` when `algorithm` is {name!r} ({cls.Config.__name__})."})
        which = ", ".join(f"{name!r}: {cls.Config.__name__}" for name, cls in _algorithms().items())
        return {"type": "object", "anyOf": variants, "title": "Algorithm Params",
                "description": f"The config fields of the job's `algorithm` ({which}); validated against that "
                               "algorithm's config at submission (unknown or invalid fields: 422 naming "
                               "`algorithm_params.<field>`). Omitted fields keep the algorithm's defaults."}


def check_algorithm_params(algorithm: str, params: dict[str, Any]) -> None:
    """Validate ``params`` against ``algorithm``'s Config. Raises pydantic's ValidationError with
    one error per problem at ``("algorithm_params", *field path)``, its original ``type``, and a
    message naming the algorithm (and, for an unknown field, the known ones)."""
    cls = _algorithms()[algorithm]
    try:
        cls.Config.model_validate(params)
    except ValidationError as exc:
        known = ", ".join(cls.Config.model_fields)
        details = []
        for err in exc.errors():
            msg = f"{err['msg']} (algorithm {algorithm!r}" + (f" takes: {known})" if err["type"] == "extra_forbidden" else ")")
            details.append(InitErrorDetails(type=PydanticCustomError(err["type"], msg),  # no context: the message is literal
                                            loc=("algorithm_params", *err["loc"]), input=err["input"]))
        raise ValidationError.from_exception_data("JobSpec", details) from None
