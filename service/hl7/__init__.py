"""HL7 v2.5.1 ORU^R01 messages of specimen reports, for a lab information system (docs/HL7.md)."""
