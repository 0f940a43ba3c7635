"""The project's one error tree, split by what the caller should do about each error.

    CdsError                      root; never raised itself
    ├── InputError                the caller gave something unusable: fix the input (CLI exit 2)
    │   └── HookRequestError      a CDS Hooks request that breaks the spec (HTTP 400)
    ├── DefinitionError           a trial definition or value set is malformed: a bug in the
    │                             shipped rule data, found at load time (CLI exit 3)
    ├── ClientAuthError           a CDS client failed authentication (HTTP 401, no detail)
    ├── PrefetchUnavailable       required FHIR data cannot be obtained at all (HTTP 412)
    └── FhirError                 talking to a FHIR server went wrong
        ├── UntrustedFhirServer   refused before a packet was sent: not on the allowlist
        ├── FhirTemporaryError    retryable: timeout, connection reset, 429, 502/503/504
        └── FhirFatalError        do not retry the same request
            ├── FhirAuthError     401/403 or a token request that failed
            ├── FhirNotFound      404/410: the resource or patient does not exist
            ├── FhirRejected      another 4xx: the server refused what was sent
            │   └── FixtureLoadError  ... a fixture bundle, naming its file and entry
            ├── FhirBadResponse   a 2xx/5xx body that is not the FHIR JSON it should be
            └── FhirSearchFailed  a searchset carrying an error OperationOutcome: its entries
                                  are not the whole answer ("none found" is not known)
    OutputError                   results cannot be written (disk full, no permission)

Foreign exceptions (requests, jsonschema, json, jwt) are translated where they enter the
project and chained with ``raise ... from exc`` so the cause stays in the logs.
Messages never contain access tokens, JWTs or patient data beyond resource ids.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CdsError(Exception):
    """Root of every error this project raises on purpose."""

    #: process exit status when this error ends a CLI command
    exit_code: ClassVar[int] = 1


class InputError(CdsError):
    """Unusable input from the caller: a file, an argument, a request body."""

    exit_code: ClassVar[int] = 2

    def __init__(self, message: str, *, source: str | None = None) -> None:
        #: what the input was (a file path, a request field); named first in the message
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class HookRequestError(InputError):
    """A CDS Hooks request that the spec does not allow; answered with 400 and an
    OperationOutcome whose ``expression`` names the offending field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(message, source=field)


class DefinitionError(CdsError):
    """A trial definition or value set that fails validation when loaded."""

    exit_code: ClassVar[int] = 3

    def __init__(
        self,
        message: str,
        *,
        file: str,
        criterion: str | None = None,
        field: str | None = None,
    ) -> None:
        self.file = file
        self.criterion = criterion
        self.field = field
        where = file
        if criterion:
            where += f", criterion {criterion}"
        if field:
            where += f", field {field}"
        super().__init__(f"{where}: {message}")


class ClientAuthError(CdsError):
    """A CDS client's JWT is missing or invalid. The reason is logged, never returned."""


class PrefetchUnavailable(CdsError):
    """Data the service requires could neither be prefetched nor fetched (CDS Hooks 2.0:
    "the CDS Service MUST respond with an HTTP 412 Precondition Failed status code")."""


class FhirError(CdsError):
    """Something went wrong talking to a FHIR server."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        outcome: dict[str, Any] | None = None,
    ) -> None:
        #: the URL called, without query string credentials (we never put tokens in URLs)
        self.url = url
        self.status = status
        #: the server's OperationOutcome, when it sent one
        self.outcome = outcome
        super().__init__(message)


class UntrustedFhirServer(FhirError):
    """The FHIR base URL is not one this service is configured to trust."""


class FhirTemporaryError(FhirError):
    """A failure that may go away: the request can be retried later."""


class FhirFatalError(FhirError):
    """A failure that retrying the same request will not fix."""


class FhirAuthError(FhirFatalError):
    """The server refused our credentials, or a token could not be obtained."""


class FhirNotFound(FhirFatalError):
    """The requested resource does not exist on the server."""


class FhirRejected(FhirFatalError):
    """The server refused the request (a 4xx other than auth, not-found and 429)."""


class FhirBadResponse(FhirFatalError):
    """The server answered with something that is not the FHIR JSON it should be."""


class FhirSearchFailed(FhirFatalError):
    """A search whose Bundle reports an error or fatal OperationOutcome (FHIR R4 3.1.1.5.4,
    ``search.mode = outcome``): what it holds cannot be read as everything on record."""


class OutputError(CdsError):
    """Results could not be written: the disk is full, a file size limit, no permission."""

    exit_code: ClassVar[int] = 4

    def __init__(self, message: str, *, source: str | None = None) -> None:
        #: the file or directory that could not be written
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class FixtureLoadError(FhirRejected):
    """The server refused a fixture bundle; names the file and, when it can, the entry."""

    def __init__(
        self,
        message: str,
        *,
        file: str,
        entry_index: int | None,
        url: str | None = None,
        status: int | None = None,
        outcome: dict[str, Any] | None = None,
    ) -> None:
        self.file = file
        self.entry_index = entry_index
        super().__init__(message, url=url, status=status, outcome=outcome)
