"""FHIR R4 access: bundles, REST client, SMART auth, the trial-derived queries, fixture loader."""
