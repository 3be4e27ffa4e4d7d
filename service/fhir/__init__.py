"""FHIR R4 output: a specimen (or field) report as a `Bundle` of type `collection`.

`bundle.report_bundle` maps a `Report` to plain JSON-ready dicts (no FHIR library at run time);
`codes` holds the LOINC, UCUM and local code tables. The mapping is documented in docs/FHIR.md.
"""
