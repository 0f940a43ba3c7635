"""Registry-wide sweeps: every patient of a FHIR server or NDJSON export, screened in partitions."""
