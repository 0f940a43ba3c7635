"""The one OperationOutcome policy for searchset Bundles, whoever reads them (REST search
paging, Bulk paging, CDS Hooks prefetch, Bundles read from files).

FHIR R4 3.1.1.5.4: a server may add OperationOutcome entries (``search.mode = outcome``) to a
searchset "with hints and warnings about the search process". An issue of severity
``error`` or ``fatal`` (R4 issue-severity: "the issue is sufficiently important to cause the
action to fail" / "the issue caused the action to fail") means the entries are not the whole
answer: reading them as "nothing on record" would turn a failed query into a negative
finding. ``warning`` and ``information`` leave the data usable and are reported as warnings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SearchPage", "outcome_failed", "outcome_message", "read_searchset"]

JSONDict = dict[str, Any]

#: R4 issue-severity codes that mean the operation did not succeed
FAILED_SEVERITIES = frozenset({"error", "fatal"})
_HARMLESS_SEVERITIES = frozenset({"warning", "information"})


def outcome_message(outcome: Mapping[str, Any] | None) -> str | None:
    """The human message of an OperationOutcome: issue[0].details.text, else its diagnostics."""
    if not outcome or outcome.get("resourceType") != "OperationOutcome":
        return None
    issues = outcome.get("issue")
    if not isinstance(issues, list) or not issues or not isinstance(issues[0], dict):
        return None
    issue = issues[0]
    details = issue.get("details")
    if isinstance(details, dict) and isinstance(details.get("text"), str) and details["text"]:
        return str(details["text"])
    diagnostics = issue.get("diagnostics")
    if isinstance(diagnostics, str) and diagnostics:
        return diagnostics
    return None


def outcome_failed(outcome: Mapping[str, Any]) -> bool:
    """True unless every issue is plainly a warning or information. An OperationOutcome
    without readable issues (R4 requires issue 1..*) cannot be shown harmless, so it fails."""
    if outcome.get("resourceType") != "OperationOutcome":
        return True  # a search.mode=outcome entry that is not even an OperationOutcome
    issues = outcome.get("issue")
    if not isinstance(issues, list) or not issues:
        return True
    return not all(
        isinstance(issue, dict) and issue.get("severity") in _HARMLESS_SEVERITIES
        for issue in issues
    )


@dataclass
class SearchPage:
    """One searchset page read by the policy."""

    #: data resources (entries that are not outcomes)
    resources: list[JSONDict] = field(default_factory=list)
    #: every outcome entry's resource
    outcomes: list[JSONDict] = field(default_factory=list)
    #: one line per harmless outcome and per entry without a resource
    warnings: list[str] = field(default_factory=list)
    #: one line per error/fatal outcome: non-empty means the search failed
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.errors)


def read_searchset(bundle: Mapping[str, Any], where: str) -> SearchPage:
    """Split a searchset Bundle's entries into data, warnings and errors.

    An entry is an outcome when its ``search.mode`` is ``outcome`` or its resource is an
    OperationOutcome. ``where`` names the search in messages (never patient data).
    """
    page = SearchPage()
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        page.errors.append(f"{where}: Bundle.entry is not an array")
        return page
    for index, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            page.warnings.append(f"{where}: entry {index} has no resource")
            continue
        search = entry.get("search")
        mode = search.get("mode") if isinstance(search, dict) else None
        if mode == "outcome" or resource.get("resourceType") == "OperationOutcome":
            page.outcomes.append(resource)
            message = outcome_message(resource) or "(no message)"
            if outcome_failed(resource):
                page.errors.append(f"{where}: the server reported an error: {message}")
            else:
                page.warnings.append(f"{where}: server said: {message}")
            continue
        page.resources.append(resource)
    return page
