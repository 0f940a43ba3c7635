"""Test suite for the cds package."""
