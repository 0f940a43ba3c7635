"""Registry-wide sweeps: every patient of a FHIR server, Bulk export or NDJSON directory."""
