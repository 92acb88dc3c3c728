"""A request's output constraint -> one `StructuredOutputsParams`, and its errors -> its fields.

Three ways to ask, as vLLM's OpenAI server takes them, each mapped to the same engine constraint:

- OpenAI's `response_format`: `{"type": "json_object"}` -> `json_object=True`;
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` -> `json=schema`
  (`{"type": "text"}`: no constraint);
- vLLM's `structured_outputs` (the client's `extra_body`): `{"json" | "regex" | "choice" |
  "grammar" | "json_object": ...}`, the fields of `StructuredOutputsParams`;
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

A request may set one of them, with one kind: two at once (say `response_format` and
`guided_regex`) is a 400 naming both, where vLLM would quietly let one override the other. The
engine compiles the constraint when it accepts the request and raises a ValueError for an invalid
schema, regex or grammar before anything is queued; `invalid_constraint` rewords that message with
the field the client sent, so it comes back as a 400 with `param` set, never a 500.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jaxinfer.server.protocol import RequestError
from jaxinfer.structured_outputs import KINDS, StructuredOutputsParams

# The older vLLM fields, each one kind of constraint.
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
# The engine's message for a constraint that does not compile (engine/structured_output.py).
_INVALID = re.compile(
    r"^(?:prompts\[\d+\]: )?SamplingParams\.structured_outputs\.\w+ is invalid: (.*)$", re.DOTALL
)
_PARAMS_FIELD = re.compile(r"StructuredOutputsParams\.\w+")


@dataclass(frozen=True, kw_only=True)
class RequestedConstraint:
    """One constraint as the request gave it: `param` is the top-level field (OpenAI's error
    `param`), `path` where the value sits in the body (for messages), `kind` and `value` the
    `StructuredOutputsParams` field it sets."""

    param: str
    path: str
    kind: str
    value: Any


def requested_constraints(request: Any) -> list[RequestedConstraint]:
    """Every constraint the request sets, in the order of the fields above (none: [])."""
    found: list[RequestedConstraint] = []
    response_format = request.response_format
    if response_format is not None:
        schema = response_format.json_schema
        if response_format.type != "json_schema" and schema is not None:
            raise RequestError(
                "response_format.json_schema: only allowed when type is 'json_schema'",
                "response_format",
            )
        if response_format.type == "json_object":
            found.append(RequestedConstraint(
                param="response_format", path="response_format", kind="json_object", value=True
            ))  # fmt: skip
        elif response_format.type == "json_schema":
            if schema is None or schema.json_schema is None:
                raise RequestError(
                    "response_format.json_schema.schema is required when type is 'json_schema'",
                    "response_format",
                )
            found.append(RequestedConstraint(
                param="response_format", path="response_format.json_schema.schema", kind="json",
                value=schema.json_schema,
            ))  # fmt: skip
    body = request.structured_outputs
    if body is not None:
        fields = body.model_dump(by_alias=True)  # "json" is an alias: BaseModel has .json()
        given = {kind: fields[kind] for kind in KINDS if fields[kind] not in (None, False)}
        if not given:
            raise RequestError(
                f"structured_outputs: needs one of {', '.join(KINDS)}", "structured_outputs"
            )
        found += [
            RequestedConstraint(
                param="structured_outputs",
                path=f"structured_outputs.{kind}",
                kind=kind,
                value=value,
            )
            for kind, value in given.items()
        ]
    for field, kind in GUIDED_FIELDS.items():
        value = getattr(request, field)
        if value is not None:
            found.append(RequestedConstraint(param=field, path=field, kind=kind, value=value))
    return found


def structured_outputs(request: Any) -> StructuredOutputsParams | None:
    """The request's constraint as the engine takes it; a RequestError naming the fields when it
    sets more than one, or one of the wrong shape (an empty choice list)."""
    found = requested_constraints(request)
    if not found:
        return None
    if len(found) > 1:
        raise RequestError(
            f"{', '.join(c.path for c in found)}: a request takes one structured-output "
            "constraint (response_format, structured_outputs or a guided_* field, one kind)",
            found[0].param,
        )
    (constraint,) = found
    try:
        return StructuredOutputsParams(**{constraint.kind: constraint.value})
    except (TypeError, ValueError) as error:
        message = _PARAMS_FIELD.sub(constraint.path, str(error))
        raise RequestError(message, constraint.param) from None


def invalid_constraint(message: str, request: Any) -> tuple[str, str] | None:
    """The engine's "structured_outputs.<kind> is invalid: ..." -> (message, param) with the
    request's own field, or None for any other message."""
    matched = _INVALID.match(message)
    if matched is None:
        return None
    found = requested_constraints(request) if request is not None else []
    if len(found) != 1:
        return None
    (constraint,) = found
    return f"{constraint.path} is invalid: {matched.group(1)}", constraint.param
