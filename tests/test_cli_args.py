"""Command-line arguments that cannot be right are usage errors (exit 2, the option named), and an
output that cannot be written is one line on stderr with exit 74, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_cli import ROOT, _render, needs_models

from smearscope.cli import build_parser, main


@pytest.mark.parametrize("argv", [
    ["--log-level", "BOGUS", "schema"],
    ["calibrate-scale", "m.png", "--division-um", "nan"],
    ["calibrate-scale", "m.png", "--division-um", "0"],
    ["calibrate-scale", "m.png", "--division-um", "inf"],
    ["calibrate-atypical", "x.png", "--min-cells", "0"],
    ["calibrate-atypical", "x.png", "--microns-per-pixel", "-1"],
    ["adapt-wbc", "--labels", "t.csv", "--out", "o.json", "--microns-per-pixel", "0"],
    ["adapt-wbc", "--labels", "t.csv", "--out", "o.json", "--microns-per-pixel", "3"],
    ["dashboard", "--broker", "ws://localhost:9001", "--port", "70000"],
    ["demo", "--seed", "-1"],
    ["demo", "--fields", "0"],
    ["run", "--max-fields", "0"],
])
def test_arguments_out_of_range_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    option = next((a for a in argv if a.startswith("--") and a != "--labels" and a != "--out"
                   and a != "--broker"), None)
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--log-level", "debug", "schema"],
    ["calibrate-scale", "m.png", "--division-um", "2.5"],
    ["calibrate-atypical", "x.png", "--microns-per-pixel", "0.1", "--min-cells", "1"],
    ["dashboard", "--broker", "ws://localhost:9001", "--port", "65535"],
    ["demo", "--seed", "0"],
])
def test_arguments_in_range_are_taken(argv):
    args = build_parser().parse_args(argv)
    assert args.command == argv[-1] or args.command in argv


def test_a_full_stdout_is_a_one_line_error_not_a_traceback():
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "smearscope", "schema"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 74, proc.stderr
    assert "Traceback" not in proc.stderr and "smearscope schema:" in proc.stderr


def test_version_is_the_installed_packages(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"smearscope {version('smearscope')}"


def test_documented_defaults():
    """The defaults docs/CLI.md promises, which a script that leaves an option out relies on."""
    analyze = build_parser().parse_args(["analyze", "f.png"])
    from smearscope.cli.analyze import DETECTIONS_FLOOR

    # --detections-floor is left None so that one given without --detections is told; 0.001 is filled in
    assert analyze.check_calibration == 3 and analyze.detections_floor is None and DETECTIONS_FLOOR == 0.001
    assert build_parser().parse_args(["calibrate-scale", "m.png"]).division_um == 10.0
    atypical = build_parser().parse_args(["calibrate-atypical", "f.png"])
    assert atypical.budget == 0.05 and atypical.min_cells == 200
    assert build_parser().parse_args(["adapt-wbc", "--labels", "t.csv", "--out", "o.json"]).min_cells == 10


def test_the_log_threshold_is_warning_unless_given():
    """--log-level (default WARNING) is the threshold of the whole process's log."""
    probe = ("import logging, sys\n"
             "from smearscope.cli import main\n"
             "main(sys.argv[1:])\n"
             "print(logging.getLevelName(logging.getLogger().getEffectiveLevel()), file=sys.stderr)\n")
    for extra, level in (([], "WARNING"), (["--log-level", "debug"], "DEBUG"), (["--log-level", "ERROR"], "ERROR")):
        proc = subprocess.run([sys.executable, "-c", probe, *extra, "schema"], capture_output=True, text=True,
                              timeout=120, cwd=ROOT, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == level, (extra, proc.stderr)


def test_a_reader_that_leaves_early_is_not_an_error():
    """`smearscope ... | head`: stdout's reader gone before the output is written: exit 0, no
    traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "smearscope", "schema"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, text=True)
    proc.stdout.close()  # before the interpreter has even started writing
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_logs_read_by_journald_carry_their_level_as_a_syslog_priority(tmp_path) -> None:
    """Under systemd stderr goes to the journal, which filed every line at priority 6 (info):
    `journalctl -u smearscope -p warning` showed none of the station's warnings and errors, and each
    line carried a second timestamp beside journald's. When $JOURNAL_STREAM names stderr the lines
    now start with sd-daemon's <N> prefix (ERROR <3>, WARNING <4>) and have no timestamp of their own."""
    import os
    import re
    import subprocess
    import sys

    stderr_path = tmp_path / "stderr"
    code = ("import logging; from smearscope.service.journal_log import setup_logging; setup_logging('INFO'); "
            "log = logging.getLogger('smearscope.x'); log.error('e'); log.warning('w'); log.info('i')\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('t')")
    command = [sys.executable, "-c", code]
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with open(stderr_path, "wb") as err:
        st = os.fstat(err.fileno())
        subprocess.run(command, stderr=err, stdout=subprocess.DEVNULL, check=False,
                       env={**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    journal = stderr_path.read_text().splitlines()
    assert journal[:4] == ["<3>ERROR smearscope.x: e", "<4>WARNING smearscope.x: w", "<6>INFO smearscope.x: i",
                           "<3>ERROR smearscope.x: t"], journal
    # journald files each line on its own: every line of a traceback is an error too
    assert len(journal) > 5 and all(line.startswith("<3>") for line in journal[3:]), journal
    assert journal[-1] == "<3>ZeroDivisionError: division by zero", journal
    with open(stderr_path, "wb") as err:  # a terminal or a file: as before
        subprocess.run(command, stderr=err, stdout=subprocess.DEVNULL, check=False, env={**env, "JOURNAL_STREAM": "1:2"})
    plain = stderr_path.read_text().splitlines()
    assert len(plain) > 4 and not any(line.startswith("<") for line in plain) and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR smearscope.x: e$", plain[0]), plain


def test_the_daemons_own_entry_point_logs_for_journald_as_smearscope_run_does(tmp_path) -> None:
    """`python -m smearscope.service.station.daemon` (documented as `smearscope run`) set up plain
    logging: under systemd its warnings were filed as info. Its lines now carry the priority and
    the thread too, and no timestamp, when $JOURNAL_STREAM names stderr."""
    import os
    import subprocess
    import sys

    code = ("import logging, sys; from smearscope.service.station import daemon\n"
            "daemon.run_daemon = lambda *a, **k: logging.getLogger('smearscope.x').warning('w') or 0\n"
            "sys.exit(daemon.main([]))")
    stderr_path = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with open(stderr_path, "wb") as err:
        st = os.fstat(err.fileno())
        done = subprocess.run([sys.executable, "-c", code], stderr=err, stdout=subprocess.DEVNULL, check=False,
                              env={**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert done.returncode == 0
    assert stderr_path.read_text().splitlines() == ["<4>WARNING MainThread smearscope.x: w"]


def test_the_daemons_own_entry_point_keeps_the_stations_files_private_as_smearscope_run_does(tmp_path) -> None:
    """`python -m smearscope.service.station.daemon` (documented as `smearscope run`) ran under the
    caller's umask: started by hand under 022 its outbox, gallery and overlays were readable by
    every user, where `smearscope run` adds 027 (files 0640, folders 0750)."""
    import subprocess
    import sys

    code = ("import os, sys; from smearscope.service.station import daemon\n"
            "daemon.run_daemon = lambda *a, **k: print(oct(os.umask(0))) or 0\n"
            "sys.exit(daemon.main([]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, umask=0o022,
                          cwd=tmp_path)
    assert done.stdout.strip() == "0o27", done.stdout + done.stderr


@needs_models
def test_log_level_after_the_command_is_taken_as_before_it(tmp_path):
    """`smearscope analyze F --log-level INFO`, where people put a command's options, was a usage
    error ("unrecognized arguments"); it now logs at INFO as `smearscope --log-level INFO analyze F`
    does, on every command and archive's subcommands, the later of two counting."""
    parse = build_parser().parse_args
    for argv in (["validate-config", "s.toml"], ["doctor"], ["run"], ["schema"], ["archive", "find"],
                 ["archive", "show", "R"], ["install-models", "d"], ["calibrate-scale", "m.png"]):
        assert parse([*argv, "--log-level", "debug"]).log_level == "DEBUG", argv
        assert parse(["--log-level", "ERROR", *argv]).log_level == "ERROR", argv
        assert parse(["--log-level", "ERROR", *argv, "--log-level", "INFO"]).log_level == "INFO", argv
        assert parse(argv).log_level is None, argv
    field = tmp_path / "f.png"
    _render(field, 4)
    runs = {where: subprocess.run([sys.executable, "-m", "smearscope", *argv], capture_output=True, text=True,
                                  cwd=ROOT, timeout=300, check=False)
            for where, argv in (("after", ["analyze", str(field), "--json", "--log-level", "INFO"]),
                                ("before", ["--log-level", "INFO", "analyze", str(field), "--json"]))}
    for where, proc in runs.items():
        assert proc.returncode == 0 and '"report_id"' in proc.stdout, (where, proc.stderr[-800:])
        assert " INFO smearscope.engines.onnxruntime_engine: loaded seg.onnx" in proc.stderr, (where, proc.stderr)
