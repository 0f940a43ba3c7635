"""FHIR R4 access: bundles, REST client, SMART auth, fixtures loader and the trial-derived queries."""
