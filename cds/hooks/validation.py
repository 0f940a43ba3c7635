"""JSON Schema validation of hook requests and feedback, with errors that name the field."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource

from cds.errors import HookRequestError

__all__ = [
    "SERVED_HOOKS",
    "load_schema",
    "parse_json_body",
    "validate_context",
    "validate_feedback",
    "validate_request",
    "validator_for",
]

#: hooks with a context schema here (Hook Library STU1 contexts)
SERVED_HOOKS = ("patient-view", "order-select", "order-sign")


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A schema shipped in ``cds/hooks/schemas/`` by file stem (``"hook-request"``)."""
    text = resources.files("cds.hooks").joinpath(f"schemas/{name}.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def validator_for(name: str, definition: str | None = None) -> Draft202012Validator:
    """A validator for a whole schema, or for one of its ``$defs`` (refs resolve in the file)."""
    schema = load_schema(name)
    if definition is None:
        return Draft202012Validator(schema)
    registry: Registry[Any] = Registry().with_resource(
        schema["$id"], Resource.from_contents(schema)
    )
    return Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{definition}"}, registry=registry)


#: deepest nesting accepted in a request body. FHIR resources in prefetch nest a dozen levels
#: or so (Bundle > entry > resource > component > code > coding); the schema validator and
#: every reader recurse, so a body nested ~1,000 deep would otherwise end in RecursionError.
MAX_DEPTH = 64

# A lone UTF-16 surrogate can only come from a "\ud800"-style escape (or from raw bytes that
# json.loads lets through with surrogatepass); without either, the walk is skipped.
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def parse_json_body(data: bytes) -> Any:
    """The request body as JSON, or a 400 that says why (without echoing the body).

    Also refused, naming the field: nesting deeper than :data:`MAX_DEPTH`, and strings holding
    a lone surrogate (valid JSON, but not Unicode text: it cannot be stored or sent as UTF-8).
    """
    if not data.strip():
        raise HookRequestError("the request body is empty; a JSON object is required")
    try:
        body = json.loads(data)
    except RecursionError as exc:
        raise HookRequestError(
            f"the request body is nested too deeply (at most {MAX_DEPTH} levels)"
        ) from exc
    except UnicodeDecodeError as exc:
        raise HookRequestError("the request body is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        # position only, never the document text
        raise HookRequestError(
            f"the request body is not valid JSON (line {exc.lineno} column {exc.colno})"
        ) from exc
    except ValueError as exc:
        raise HookRequestError("the request body is not valid JSON") from exc
    _check_structure(body, surrogates=_SURROGATE_HINT.search(data) is not None)
    return body


def _check_structure(body: Any, *, surrogates: bool) -> None:
    """Depth, and lone surrogates when the raw body hints at them. Iterative (no recursion,
    whatever the depth) and path-free on the way: only a failure walks again for the path."""
    # Level by level (breadth first): a list comprehension per level keeps this at a few
    # ms for a megabyte of prefetch.
    level: list[Any] = [body] if isinstance(body, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            path = _find(body, lambda _v, p: len(p) >= MAX_DEPTH) or ()
            raise HookRequestError(
                f"nested too deeply (at most {MAX_DEPTH} levels)", field=_path(path[:8]) + "..."
            )
        level = [
            item
            for value in level
            for item in (value.values() if type(value) is dict else value)
            if type(item) is dict or type(item) is list
        ]
    if surrogates:
        found = _find(body, lambda v, _p: isinstance(v, str) and not _is_text(v))
        if found is not None:
            raise HookRequestError(
                "is not valid Unicode text (it holds a lone surrogate)", field=_path(found) or None
            )


def _find(
    body: Any, bad: Callable[[Any, tuple[str | int, ...]], bool]
) -> tuple[str | int, ...] | None:
    """The path of the first value (or member name) for which ``bad`` holds, iteratively."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if bad(value, path):
            return path
        if isinstance(value, dict):
            for key, item in value.items():
                if bad(key, path):
                    return path
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, index)) for index, item in enumerate(value))
    return None


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_request(body: Any) -> None:
    """The fields every hook request must carry (2.0 'Calling a CDS Service')."""
    if not isinstance(body, dict):
        raise HookRequestError("the request body must be a JSON object")
    _raise_first(validator_for("hook-request"), body, prefix="")


def validate_context(hook: str, context: Mapping[str, Any]) -> None:
    """The hook-specific context (Hook Library): e.g. ``patientId`` for patient-view."""
    _raise_first(validator_for("hook-request", f"context-{hook}"), context, prefix="context")


def validate_feedback(body: Any) -> None:
    """A feedback request: 2.0 'Feedback' plus the 3.0 invariants cds-fb-1..3."""
    if not isinstance(body, dict):
        raise HookRequestError("the request body must be a JSON object")
    _raise_first(validator_for("feedback"), body, prefix="")


def _raise_first(validator: Draft202012Validator, instance: Any, *, prefix: str) -> None:
    try:
        error = best_match(validator.iter_errors(instance))
    except RecursionError as exc:  # parse_json_body bounds depth; this is the backstop
        raise HookRequestError("nested too deeply", field=prefix or None) from exc
    if error is None:
        return
    field, message = _describe(error)
    expression = ".".join(p for p in (prefix, field) if p)
    raise HookRequestError(message, field=expression or None)


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(error: ValidationError) -> tuple[str, str]:
    """(FHIRPath-like field, message). Messages name schema facts, never the value sent."""
    # A failing branch of if/then or anyOf reports on the deepest useful error.
    while error.context and error.validator != "anyOf":
        deeper = best_match(error.context)
        if deeper is None:
            break
        error = deeper
    field = _path(error.absolute_path)
    kind = error.validator
    if kind == "required":
        instance = error.instance if isinstance(error.instance, dict) else {}
        wanted = error.validator_value if isinstance(error.validator_value, list) else []
        missing = next((name for name in wanted if name not in instance), None)
        if missing is not None:
            field = f"{field}.{missing}" if field else str(missing)
            return field, "required field is missing"
        return field, "required field is missing"
    if kind == "dependentRequired":
        # 3.0 cds-r-1: "fhirAuthorization present => fhirServer present"
        dependencies: dict[str, list[str]] = dict(error.validator_value)  # type: ignore[arg-type]
        owner, needed = next(iter(dependencies.items()))
        if isinstance(error.instance, dict) and owner in error.instance:
            missing_dep = next((n for n in needed if n not in error.instance), needed[0])
            full = f"{field}.{missing_dep}" if field else missing_dep
            return full, f"{missing_dep} is required when {owner} is present"
        return field, "a field depends on another that is missing"
    if kind == "type":
        return field, f"must be of JSON type {_types(error.validator_value)}"
    if kind in ("const", "enum"):
        value: Any = error.validator_value
        allowed = [value] if kind == "const" else list(value or [])
        return field, "must be one of " + ", ".join(json.dumps(v) for v in allowed)
    if kind == "pattern":
        if error.instance in (".", "..") or str(error.instance).endswith(("/.", "/..")):
            return field, "is not a usable FHIR id ('.' and '..' are URL path segments)"
        return field, "has an invalid format"
    if kind in ("minLength", "minItems", "minProperties"):
        return field, "must not be empty"
    if kind in ("maxLength", "maxItems"):
        return field, f"is too long (at most {error.validator_value})"
    if kind == "minimum":
        return field, f"must be at least {error.validator_value}"
    if kind == "anyOf":
        return field, "must contain at least one of the allowed fields"
    return field, "is invalid"


def _types(value: Any) -> str:
    if isinstance(value, list):
        return " or ".join(str(v) for v in value)
    return str(value)
