"""Clinical-trial screening from FHIR R4 data: one evaluator, a CDS Hooks service and a sweep."""

__version__ = "0.1.0"
