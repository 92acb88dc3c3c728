"""vLLM's `StructuredOutputsParams` (and the older `GuidedDecodingParams`): one constraint a
request's output must match, a JSON schema, a regex, a choice, a grammar, or any JSON object.

Checked here for its shape only (exactly one kind, the right types), without llguidance, so that
`SamplingParams` stays cheap to import; whether the schema or regex itself is valid is checked
when the engine accepts the request (jaxinfer/engine/structured_output.py), before anything runs.
"""

from __future__ import annotations

import json as json_module
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")
_BACKENDS = (None, "auto", "guidance", "llguidance")  # the one backend here is llguidance


@dataclass(frozen=True, kw_only=True)
class StructuredOutputsParams:
    """Exactly one of: `json` (a JSON schema, as a dict or its JSON text), `regex` (the whole
    output matches it), `choice` (the output is one of these strings), `grammar` (a Lark or GBNF
    grammar, as llguidance reads it), `json_object=True` (any JSON object)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"{name} needs exactly one of {', '.join(KINDS)}; got "
                f"{'none' if not given else ', '.join(given)}"
            )
        if self.json is not None and not isinstance(self.json, str | dict):
            raise TypeError(f"{name}.json must be a JSON schema (dict or str), got {self.json!r}")
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name}.{kind} must be a str, got {type(value).__name__}")
        if self.choice is not None:
            choice = self.choice
            if isinstance(choice, str) or not all(isinstance(c, str) for c in choice) or not choice:
                raise TypeError(f"{name}.choice must be a non-empty list of str, got {choice!r}")
            object.__setattr__(self, "choice", list(choice))
        if self.json_object not in (None, True, False):
            raise TypeError(f"{name}.json_object must be a bool, got {self.json_object!r}")

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as one string (a schema dict as JSON): the grammar cache's key. Keys
        keep their order: llguidance writes an object's properties in the schema's order."""
        value = getattr(self, self.kind)
        if isinstance(value, dict | list):
            return json_module.dumps(value)
        return "" if value is True else value


@dataclass(frozen=True, kw_only=True)
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's older name (`SamplingParams(guided_decoding=...)`), accepted as an alias.
    `backend` may name llguidance (or "auto"): it is the only backend here."""

    backend: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in _BACKENDS:
            raise ValueError(
                f"GuidedDecodingParams.backend must be one of {_BACKENDS} (llguidance is the only "
                f"structured-output backend), got {self.backend!r}"
            )


def as_structured_outputs(value: Any, field_name: str) -> StructuredOutputsParams | None:
    """`SamplingParams.structured_outputs` / `guided_decoding` as a StructuredOutputsParams (a dict
    of its fields is accepted: what `dataclasses.asdict` and JSON give back)."""
    if value is None or type(value) is StructuredOutputsParams:
        return value
    if isinstance(value, StructuredOutputsParams):  # GuidedDecodingParams: its constraint only
        return StructuredOutputsParams(**{kind: getattr(value, kind) for kind in KINDS})
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(KINDS) - {"backend"})
        if unknown:
            raise ValueError(f"SamplingParams.{field_name} has unknown fields {unknown}")
        if value.get("backend") not in _BACKENDS:
            raise ValueError(
                f"SamplingParams.{field_name}.backend must be one of {_BACKENDS}, "
                f"got {value['backend']!r}"
            )
        return StructuredOutputsParams(**{k: v for k, v in value.items() if k != "backend"})
    raise TypeError(
        f"SamplingParams.{field_name} must be a StructuredOutputsParams (or None), "
        f"got {type(value).__name__}"
    )
