"""Which FHIR servers we may talk to: an allowlist of base URLs, https except to loopback in dev."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from cds.errors import UntrustedFhirServer

_LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# RFC 3986 section 2.3: unreserved characters; their percent-encodings are equivalent to them
# (section 6.2.2.2), and requests decodes them before sending, so "%2e%2e" leaves as "..".
_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|5[fF]|7[eE]|[46][1-9a-fA-F]|[57][0-9aA]|3[0-9])")


def _decode_unreserved(path: str) -> str:
    return _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4: the path with ``.`` and ``..`` segments resolved, as servers
    (and urllib3, before sending) resolve them."""
    output: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
            continue
        if segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
            continue
        output.append(segment)
    result = "/".join(output)
    return result if not path.startswith("/") or result.startswith("/") else "/" + result


def normalise_url(url: str) -> str:
    """The URL as it will be sent and served: scheme and host lower-cased, percent-encoded
    unreserved characters decoded, dot segments removed (RFC 3986 section 6.2.2). Every
    allowlist check compares this form, so a ``/../`` or ``%2e%2e`` cannot walk out of a
    trusted base after the check."""
    parts = urlsplit(url.strip())
    path = remove_dot_segments(_decode_unreserved(parts.path))
    return urlunsplit(
        (parts.scheme.lower(), parts.netloc.lower(), path, parts.query, parts.fragment)
    )


def is_loopback_url(url: str) -> bool:
    """True when the URL's host is a loopback name or address."""
    return is_loopback(urlsplit(url).hostname or "")


def normalise_base_url(url: str) -> str:
    """The base URL in the form it is compared in: lower-case scheme and host, no trailing slash.

    Raises UntrustedFhirServer for anything that cannot be a FHIR base (no http(s) scheme, no
    host, a query, a fragment or credentials in the URL). The URL is not echoed when it holds
    credentials.
    """
    parts = urlsplit(url.strip())
    if parts.username is not None or parts.password is not None:
        raise UntrustedFhirServer("a FHIR base URL must not contain credentials")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UntrustedFhirServer(f"not an http(s) FHIR base URL: {url!r}", url=url)
    if parts.query or parts.fragment:
        raise UntrustedFhirServer(f"a FHIR base URL has no query or fragment: {url!r}", url=url)
    path = remove_dot_segments(_decode_unreserved(parts.path)).rstrip("/")
    return urlunsplit((scheme, parts.netloc.lower(), path, "", ""))


def check_transport(url: str, *, allow_insecure_loopback: bool) -> None:
    """Refuse plain http unless it goes to loopback and that was allowed (development only)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https":
        return
    if scheme == "http" and allow_insecure_loopback and is_loopback(parts.hostname or ""):
        return
    if scheme == "http":
        raise UntrustedFhirServer(
            f"plain http is allowed only to loopback with allow_insecure_loopback: {url}", url=url
        )
    raise UntrustedFhirServer(f"not an http(s) URL: {url!r}", url=url)


class TrustPolicy:
    """The FHIR base URLs this process trusts, matched exactly after normalisation."""

    def __init__(self, trusted_base_urls: Iterable[str], *, allow_insecure_loopback: bool = False):
        self._trusted = frozenset(normalise_base_url(u) for u in trusted_base_urls)
        self.allow_insecure_loopback = allow_insecure_loopback

    def __repr__(self) -> str:
        return (
            f"TrustPolicy({sorted(self._trusted)!r}, "
            f"allow_insecure_loopback={self.allow_insecure_loopback})"
        )

    def check_base(self, url: str) -> str:
        """The normalised base URL if it is trusted; UntrustedFhirServer otherwise."""
        base = normalise_base_url(url)
        if base not in self._trusted:
            raise UntrustedFhirServer(f"FHIR server is not on the allowlist: {base}", url=base)
        check_transport(base, allow_insecure_loopback=self.allow_insecure_loopback)
        return base


def check_within_base(url: str, base: str) -> str:
    """The URL to send, normalised (:func:`normalise_url`); UntrustedFhirServer when it leaves
    the trusted base. Callers send the returned URL, so what was checked is what is sent.

    Same scheme, host and port as the base, and a path equal to the base path or below it:
    HAPI's ``[base]?_getpages=...`` links and ``[base]/Type?...`` links both pass; a link to
    another host, or to a sibling path on the same host (directly or by ``/../``), does not.
    """
    url = normalise_url(url)
    parts = urlsplit(url)
    base_parts = urlsplit(base)
    if parts.username is not None or parts.password is not None:
        raise UntrustedFhirServer("refusing a URL with credentials in it", url=base)
    same_origin = (
        parts.scheme.lower() == base_parts.scheme and parts.netloc.lower() == base_parts.netloc
    )
    path = parts.path.rstrip("/")
    if not same_origin or not (path == base_parts.path or path.startswith(base_parts.path + "/")):
        raise UntrustedFhirServer(
            f"refusing to follow a URL outside the trusted FHIR base {base}: "
            f"{parts.scheme}://{parts.netloc}{parts.path}",
            url=base,
        )
    return url
