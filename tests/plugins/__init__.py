"""Pytest plugins used by the suite."""
