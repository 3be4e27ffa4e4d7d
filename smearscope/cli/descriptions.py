"""What each subcommand's `--help` says it does and when to use it, in docs/CLI.md's words (the
subcommands whose parser does not carry a longer description of its own)."""

from __future__ import annotations

import argparse

DESCRIPTIONS = {
    "demo": "Analyze fields rendered by the built-in synthetic microscope and score the cells found against "
            "the renderer's truth (recall and precision per cell kind, next to each report's summary). Needs no "
            "camera, broker or dataset: use it to see that the models load and give sense on a new machine.",
    "schema": "Print the report JSON Schema (the one every report, field and specimen, validates against), or "
              "write it into the source tree with --write. Use it to validate reports in a consumer, or to see "
              "which fields a report carries.",
    "validate-config": "Check a station config file as the station's start would (its sections, the files it "
                       "names, the WBC head and station means it uses) and exit: 0 when valid, else 78 with one "
                       "`field: reason` line per problem. Use it after editing the config, before a restart.",
    "run": "Run the station daemon (docs/STATION.md): analyse the fields its source gives, group them into "
           "specimen runs, and publish the reports over MQTT, kept in its durable outbox until the broker "
           "acknowledges them. Without --config it runs the embedded default (the synthetic microscope, MQTT on "
           "localhost:1883); --max-fields N stops after N fields and lists what it published or kept.",
    "calibrate-scale": "Measure a stage micrometer's line spacing in an image through the station's camera and "
                       "objective, and print the microns_per_pixel to put in [source] with "
                       "microns_per_pixel_calibrated_on (today) and a record line for the lab's calibration record. "
                       "Run it when the station is set up, and again after any change to the optics or camera.",
    "doctor": "Check what a station lacks, check by check: its config, models, engines, camera, scale and "
              "calibration, memory, outbox, review and typed-cells files, broker password, login and ACL, and what a "
              "running station holds back (read from its telemetry). Exit 1 if any check fails, 3 if the only "
              "failures are a camera the running station waits for. Run it after installing or changing a station.",
    "install-models": "Copy the packaged models to a folder (the station's [analysis] models_dir), each "
                      "model's sha256 checked against its manifest; exit 1 on failure. Run it at installation and "
                      "after an upgrade that brings new models.",
    "build-engines": "Build TensorRT engines for the models on a Jetson: each engine named by the GPU's compute "
                     "capability, with its build record (size, sha256); one not matching it is built again, and "
                     "TensorRT's timing cache is kept beside them (docs/STATION.md). Run it once before the station "
                     "starts with engine_backend tensorrt, and after new models or a JetPack upgrade.",
    "archive find": "List the archived reports, the latest per run first, by specimen id, run, station or date "
                    "(--not-accepted: only those a lab system did not accept). Use it to find a specimen's report "
                    "again (docs/ARCHIVE.md).",
    "archive show": "Print one archived report as it was received, or its FHIR bundle (--fhir) or HL7 message "
                    "(--hl7), or copy N kept beside it (--copy N). Use it with a report id `archive find` listed "
                    "(docs/ARCHIVE.md).",
    "archive send-hl7": "Send archived specimen reports to the lab system as HL7 v2.5.1 ORU^R01 messages, each "
                        "once: those the index records no delivery of (--since DATE or --all), or a report the lab "
                        "system did not accept and the ones held behind it (--resend). Use it after connecting a lab "
                        "system, or once it has fixed what it refused (docs/HL7.md).",
}


def describe(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Give each subcommand of `parser` (and theirs) without a description the one above."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                key = f"{prefix}{name}"
                if sub.description is None and key in DESCRIPTIONS:
                    sub.description = DESCRIPTIONS[key]
                describe(sub, f"{key} ")
