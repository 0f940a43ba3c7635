"""Shared pytest configuration: plugins that start real services, and fixed dates."""

from __future__ import annotations

pytest_plugins = ["tests.plugins.fhir_server", "tests.plugins.browser"]
