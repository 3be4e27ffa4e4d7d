"""The report archive: every station's reports and FHIR bundles kept on disk, found by specimen."""
