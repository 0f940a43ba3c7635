"""The service registry: the one list that both answers discovery and routes hook calls."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cds.errors import DefinitionError, HookRequestError

__all__ = ["PREFETCH_TOKENS", "Service", "ServiceRegistry", "lint_template"]

# Hook Library STU1: context fields flagged "Prefetch Token = Yes", per hook.
PREFETCH_TOKENS: Mapping[str, frozenset[str]] = {
    "patient-view": frozenset({"userId", "patientId", "encounterId"}),
    "order-select": frozenset({"userId", "patientId", "encounterId"}),
    "order-sign": frozenset({"userId", "patientId", "encounterId"}),
}
# 2.0 'Prefetch tokens': the user tokens, valid for every hook.
_USER_TOKENS = frozenset(
    {"userPractitionerId", "userPractitionerRoleId", "userPatientId", "userRelatedPersonId"}
)
_TOKEN = re.compile(r"\{\{([^{}]*)\}\}")
_SERVICE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]+$")
_DATE_PREFIX = re.compile(r"^(eq|lt|gt|ge|le)?\d{4}")
_PLAIN_PARAM = re.compile(r"^[a-z][A-Za-z0-9-]*(:in)?$")


@dataclass(frozen=True, slots=True)
class Service:
    """One (id, hook) pair of discovery, with the function that answers it."""

    id: str
    hook: str
    title: str
    description: str
    usage_requirements: str
    prefetch: Mapping[str, str]
    handler: Callable[[Any], list[dict[str, Any]]]

    def discovery(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "usageRequirements": self.usage_requirements,
        }
        # 2.0 'Use of JSON': an empty optional field is omitted, never sent as {}.
        if self.prefetch:
            entry["prefetch"] = dict(self.prefetch)
        return entry


def lint_template(hook: str, key: str, template: str) -> None:
    """2.0 prefetch rules: root-level prefetch-token context fields or user tokens only (no
    3.0 ``today()``/FHIRPath), relative read or type search, and the recommended query subset
    (token equality with optional ``:in``, date prefixes, ``_count``, ``_sort``)."""
    where = f"prefetch template {key!r} of hook {hook}"

    def bad(message: str) -> DefinitionError:
        return DefinitionError(message, file="cds.fhir.queries.prefetch_templates", field=where)

    for token in _TOKEN.findall(template):
        if token.startswith("context."):
            if token[len("context.") :] not in PREFETCH_TOKENS.get(hook, frozenset()):
                raise bad(f"{{{{{token}}}}} is not a prefetch token of {hook}")
        elif token not in _USER_TOKENS:
            raise bad(f"{{{{{token}}}}} is not a CDS Hooks 2.0 prefetch token")
    if "{" in _TOKEN.sub("", template) or "}" in _TOKEN.sub("", template):
        raise bad("unbalanced braces")
    parts = urlsplit(template)
    if parts.scheme or parts.netloc or template.startswith("/"):
        raise bad("must be relative to the FHIR base")
    segments = parts.path.split("/")
    if not _RESOURCE_TYPE.match(segments[0]) or len(segments) > 2:
        raise bad("must be Type/{{id}} or Type?query")
    if len(segments) == 2 and parts.query:
        raise bad("a read takes no query")
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in ("_count",):
            if not value.isdigit():
                raise bad("_count must be a number")
        elif name == "_sort":
            continue
        elif not _PLAIN_PARAM.match(name):
            raise bad(f"query parameter {name!r} is outside the 2.0 recommended subset")
        elif not value:
            raise bad(f"query parameter {name!r} has no value")
        elif (
            name.endswith("date") and not _TOKEN.fullmatch(value) and not _DATE_PREFIX.match(value)
        ):
            raise bad(f"date parameter {name!r} uses a prefix outside eq|lt|gt|ge|le")


class ServiceRegistry:
    """The services offered. Discovery is generated from it and calls are routed by it, so the
    two cannot drift (the sandbox's separate discovery JSON can)."""

    def __init__(self, services: Iterable[Service]) -> None:
        self._services: dict[tuple[str, str], Service] = {}
        for service in services:
            if not _SERVICE_ID.match(service.id):
                raise DefinitionError(
                    "service id must match [A-Za-z0-9._-]+", file="cds.hooks", field=service.id
                )
            key = (service.id, service.hook)
            if key in self._services:
                raise DefinitionError("duplicate (id, hook)", file="cds.hooks", field=service.id)
            for prefetch_key, template in service.prefetch.items():
                lint_template(service.hook, prefetch_key, template)
            self._services[key] = service

    def __iter__(self) -> Iterator[Service]:
        return iter(self._services.values())

    def ids(self) -> set[str]:
        return {service_id for service_id, _ in self._services}

    def discovery(self) -> dict[str, Any]:
        # 2.0 Discovery: "{"services": [...]}", an empty array when nothing is offered.
        return {"services": [s.discovery() for s in self._services.values()]}

    def hooks_of(self, service_id: str) -> list[str]:
        return [hook for sid, hook in self._services if sid == service_id]

    def route(self, service_id: str, hook: str) -> Service:
        """The service for a call; the id is known (404 is the caller's check)."""
        # 2.0: the same id may be registered for several hooks; dispatch on body.hook.
        service = self._services.get((service_id, hook))
        if service is None:
            served = ", ".join(self.hooks_of(service_id))
            raise HookRequestError(
                f"service {service_id} does not serve hook {hook!r} (it serves: {served})",
                field="hook",
            )
        return service
