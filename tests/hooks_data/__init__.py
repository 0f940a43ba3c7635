"""Data and helpers of the CDS Hooks tests (tests/test_hooks_*.py)."""
