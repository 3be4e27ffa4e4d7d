"""`smearscope run` (the station daemon) and `smearscope validate-config`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from smearscope.service.config import EXIT_CONFIG, ConfigError, load_config, print_config_errors

logger = logging.getLogger(__name__)


#: Bits the station's files never grant: reports, crops and file names are the lab's, not other users'
#: (as the systemd unit's UMask=0027; started by hand under umask 022 they would be world-readable).
PRIVATE_UMASK = 0o027


def cmd_run(args: argparse.Namespace) -> int:
    from smearscope.service.station.daemon import run_daemon

    os.umask(os.umask(PRIVATE_UMASK) | PRIVATE_UMASK)  # stricter bits the caller set are kept
    return run_daemon(args.config, max_fields=args.max_fields, log_level=args.log_level)


def validate_config_main(path: str | Path, environ: Mapping[str, str] | None = None) -> int:
    """`smearscope validate-config FILE`: print each problem as `field.path: reason` (the
    files it names too: a TLS CA must exist and hold a certificate; a station's open-set section
    must fit the WBC head and station means it names, as start-up requires).

    Returns 0 when valid, EXIT_CONFIG (78) otherwise.
    """
    from smearscope.service.analysis.station_means import StationMeansError
    from smearscope.service.config.paths import relative_path_warnings
    from smearscope.service.station.preflight import file_problems
    from smearscope.service.station.startup import (
        models_problem,
        open_set_verdict,
        wbc_head_and_means,
    )

    try:
        config = load_config(path, environ)
        for where, why in relative_path_warnings(config, Path.cwd()):  # valid, but maybe not the unit's file
            print(f"{where}: warning: {why}", file=sys.stderr)
        problems = file_problems(config)
        if (missing := models_problem(config.analysis.models_dir, verify=True)) is not None:
            problems.append(("analysis.models_dir", missing))
        try:  # the station means file, read as start-up reads it
            wbc_head_and_means(config.analysis)
        except StationMeansError as exc:
            problems.append(("analysis.wbc_station_means", f"{exc.code}: {exc.message}"))
        verdict = open_set_verdict(config.analysis)
        if verdict is not None and not verdict[0]:
            problems.append(("analysis.wbc_open_set", verdict[1]))
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        print_config_errors(exc, path)
        return EXIT_CONFIG
    print(f"{path}: OK (station {config.station_id}, source {config.source.kind})")
    return 0


def cmd_validate_config(args: argparse.Namespace) -> int:
    return validate_config_main(args.config)
