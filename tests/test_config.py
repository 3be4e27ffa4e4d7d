"""The station configuration root: example file, strictness, env overrides, validate-config."""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path

import pytest
import tomllib
from broker import TlsMaterial
from pydantic import BaseModel, ValidationError

from smearscope.cli.station import validate_config_main
from smearscope.device.source_config import (
    CameraSourceConfig,
    FolderSourceConfig,
    SimulatedSourceConfig,
)
from smearscope.service.config import ConfigError, StationConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "station.example.toml"

MINIMAL = 'station_id = "bench"\n[source]\nkind = "simulated"\n'


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "station.toml"
    path.write_text(text)
    return path


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.station_id == "ward3-scope1"
    assert isinstance(config.source, CameraSourceConfig)
    assert config.analysis.tile_size == 256 and config.analysis.tile_overlap == 0.15
    assert config.mqtt.password_credential == "mqtt-password"
    # as shipped it claims no calibration: install-jetson.sh installs it as the station's config,
    # whose reports would otherwise read sizes at a scale no one measured (method "given")
    assert config.microns_per_pixel is None and config.source.microns_per_pixel is None
    text = EXAMPLE.read_text().replace("# microns_per_pixel = 0.11", "microns_per_pixel = 0.11", 1)
    text = text.replace("# microns_per_pixel_calibrated_on = 2026-12-07", "microns_per_pixel_calibrated_on = 2026-12-07", 1)
    calibrated = parse_config(tomllib.loads(text), environ={})
    assert calibrated.microns_per_pixel == 0.11
    assert calibrated.source.microns_per_pixel_calibrated_on == datetime.date(2026, 12, 7)


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL), environ={})
    assert isinstance(config.source, SimulatedSourceConfig)
    a = config.analysis
    assert (a.tile_size, a.tile_overlap, a.min_confidence, a.min_area_um2, a.max_aspect_ratio) == (
        256, 0.15, 0.35, 2.0, 5.0)
    assert (a.stain_normalization, a.engine_backend) == ("auto", "onnxruntime")
    assert config.specimen.target_wbc_count == 100
    assert config.log_level == "INFO"


def _all_models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    seen.add(model)
    for field in model.model_fields.values():
        for arg in getattr(field.annotation, "__args__", ()) + (field.annotation,):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in seen:
                _all_models(arg, seen)


def test_every_field_is_titled_described_and_strict() -> None:
    models: set[type[BaseModel]] = set()
    _all_models(StationConfig, models)
    for m in (CameraSourceConfig, FolderSourceConfig, SimulatedSourceConfig):
        _all_models(m, models)
    for model in models:
        assert model.model_config.get("extra") == "forbid", model
        for name, field in model.model_fields.items():
            assert field.title and field.description, f"{model.__name__}.{name}"


def test_env_overrides_nested_fields(tmp_path: Path) -> None:
    env = {
        "SMEARSCOPE__QUALITY__MIN_FOCUS": "80",
        "SMEARSCOPE__MQTT__HOST": "broker.lab",
        "SMEARSCOPE__SOURCE__FIELDS": "7",
        "smearscope__log_level": "debug",
        "SMEARSCOPE__SOURCE__SEED": "3",
        "SMEARSCOPE_UNRELATED": "x",
    }
    config = load_config(_write(tmp_path, MINIMAL), environ=env)
    assert config.quality.min_focus == 80.0
    assert config.mqtt.host == "broker.lab"
    assert isinstance(config.source, SimulatedSourceConfig) and config.source.fields == 7
    assert config.source.seed == 3 and config.log_level == "DEBUG"


def test_env_can_switch_source_kind_and_take_toml_arrays(tmp_path: Path) -> None:
    env = {
        "SMEARSCOPE__SOURCE__KIND": "folder",
        "SMEARSCOPE__SOURCE__PATH": str(tmp_path),
        "SMEARSCOPE__SOURCE__EXTENSIONS": '[".png", ".tif"]',
    }
    config = parse_config({"station_id": "bench", "source": {}}, environ=env)
    assert isinstance(config.source, FolderSourceConfig)
    assert config.source.extensions == (".png", ".tif")


def test_bad_env_override_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, MINIMAL), environ={"SMEARSCOPE__QUALITY__MIN_FOCUS": "sharp"})
    ((loc, msg),) = err.value.errors
    assert loc == "quality.min_focus" and "SMEARSCOPE__QUALITY__MIN_FOCUS" in msg
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(_write(tmp_path, MINIMAL), environ={"SMEARSCOPE__STATION_ID__X": "1"})


def test_validate_config_prints_field_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _write(tmp_path, """
station_id = "ward 3"
colour = "blue"
[source]
kind = "folder"
path = "/srv/inbox"
settle = 3
[analysis]
tile_size = 250
tile_overlap = 0.7
[mqtt]
password_credential = "mqtt-password"
""")
    assert validate_config_main(bad, environ={}) == 78
    lines = set(capsys.readouterr().err.splitlines())
    assert "colour: unknown key: the top level has no such setting" in lines
    assert 'source.settle: unknown key: [source] of kind = "folder" has no such setting; did you mean settle_s?' in lines
    assert "station_id: 'ward 3' may hold only letters A-Z and a-z, digits, '-' and '_' (it is a level of the " \
        "station's MQTT topics); refused: ' '" in lines
    for prefix in (
        "analysis.tile_size: tile_size must be a multiple of 32",
        "analysis.tile_overlap: Input should be less than 0.5",
    ):
        assert any(line.startswith(prefix) for line in lines), prefix
    assert "mqtt: password_credential needs a username" in lines


def test_an_unknown_key_names_its_section_and_what_was_meant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example config's camera [source] turned into a watched folder by changing its kind: the
    camera's keys left behind are said to be a camera's, a misspelt key gets its section's nearest
    setting, also when an environment variable set it (pydantic alone says "Extra inputs are not
    permitted", naming neither)."""
    text = EXAMPLE.read_text().replace('\nkind = "camera"', '\nkind = "folder"\npath = "/srv/inbox"', 1)
    text = text.replace("same_field_correlation", "same_field_corelation", 1)
    bad = _write(tmp_path, text)
    assert validate_config_main(bad, environ={"SMEARSCOPE__MQTT__PROT": "1884"}) == 78
    lines = capsys.readouterr().err.splitlines()
    for key in ("device", "reconnect_initial_s", "reconnect_max_s", "read_timeout_s"):
        assert f'source.{key}: unknown key for kind = "folder": a setting of kind = "camera" only; remove it' in lines
    assert ("quality.same_field_corelation: unknown key: [quality] has no such setting; "
            "did you mean same_field_correlation?") in lines
    assert ("mqtt.prot: unknown key: [mqtt] has no such setting; did you mean port? "
            "(set by SMEARSCOPE__MQTT__PROT)") in lines
    assert not any("Extra inputs" in line for line in lines)
    # the file's camera section, made a simulated one by a variable: the variable is named
    assert validate_config_main(EXAMPLE, environ={"SMEARSCOPE__SOURCE__KIND": "simulated"}) == 78
    assert ('source.device: unknown key for kind = "simulated": a setting of kind = "camera" only; remove it '
            "(kind set by SMEARSCOPE__SOURCE__KIND)") in capsys.readouterr().err.splitlines()


def test_an_override_with_one_underscore_is_refused_and_a_flattened_key_finds_its_section(
    tmp_path: Path,
) -> None:
    """SMEARSCOPE_MQTT__HOST (one underscore after SMEARSCOPE) was silently not read, leaving the
    file's broker; SMEARSCOPE__MQTT_HOST and `mqtt_port = ...` at the top level name the setting
    meant. SMEARSCOPE_DATA (no level: the datasets' folder) is left alone."""
    path = _write(tmp_path, MINIMAL + "[mqtt]\ntls_ca_file = 'ca.pem'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={"SMEARSCOPE_MQTT__HOST": "broker.lab", "SMEARSCOPE_DATA": "/data"})
    assert err.value.errors == [("SMEARSCOPE_MQTT__HOST", ("not read: an override starts SMEARSCOPE__, two "
                                 "underscores (did you mean SMEARSCOPE__MQTT__HOST?)"))]
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={"SMEARSCOPE__MQTT_HOST": "broker.lab", "SMEARSCOPE_DATA": "/data"})
    assert sorted(err.value.errors) == [
        ("mqtt.tls_ca_file", "unknown key: [mqtt] has no such setting; did you mean ca_file in [mqtt.tls]?"),
        ("mqtt_host", ("unknown key: the top level has no such setting; did you mean host in [mqtt]? "
                      "(set by SMEARSCOPE__MQTT_HOST)"))]


def test_a_flattened_key_is_not_pointed_at_the_section_it_names(tmp_path: Path) -> None:
    """`outbox_path` in [mqtt] and `source_kind` at the top level are nearest, letter by letter, to
    the section's own name (outbox, source): "did you mean outbox?" would have the file say
    `outbox = ...`, which is refused as a section written as a value. The setting inside is meant."""
    path = _write(tmp_path, MINIMAL.replace("[source]", "source_kind = 'folder'\nsource_path = 'in'\n[source]", 1)
                  + "[mqtt]\noutbox_path = 'o.sqlite3'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert sorted(err.value.errors) == [
        ("mqtt.outbox_path", "unknown key: [mqtt] has no such setting; did you mean path in [mqtt.outbox]?"),
        ("source_kind", "unknown key: the top level has no such setting; did you mean kind in [source]?"),
        ("source_path", "unknown key: the top level has no such setting; did you mean path in [source]?")]


def test_calibrate_scales_lines_put_under_the_wrong_section_name_the_section_they_belong_to(tmp_path: Path) -> None:
    """The example leaves microns_per_pixel unset until calibrate-scale's two lines are put in its
    [source]; added at the end of the file they land in its last section, [commands], and were
    refused with "[commands] has no such setting" and nothing about where they go."""
    text = EXAMPLE.read_text() + "microns_per_pixel = 0.10512\nmicrons_per_pixel_calibrated_on = 2026-12-07\n"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), environ={})
    assert sorted(err.value.errors) == [
        ("commands.microns_per_pixel", ("unknown key: [commands] has no such setting; a setting of [source] or "
                                        "[analysis]")),
        ("commands.microns_per_pixel_calibrated_on", ("unknown key: [commands] has no such setting; a setting of "
                                                      "[source]"))]


def test_a_kind_there_is_none_of_set_by_a_variable_names_the_variable(tmp_path: Path) -> None:
    """SMEARSCOPE__SOURCE__KIND=webcam over the example's camera [source]: 'kind = "webcam" is none
    of ...' named no variable, and the file read kind = "camera"."""
    with pytest.raises(ConfigError) as err:
        load_config(EXAMPLE, environ={"SMEARSCOPE__SOURCE__KIND": "webcam"})
    assert err.value.errors == [("source", ('kind = "webcam" is none of "camera", "folder", "replay" or "simulated" '
                                            "(set by SMEARSCOPE__SOURCE__KIND)"))]


def test_a_section_written_wrong_is_said_as_the_file_is_written(tmp_path: Path) -> None:
    """pydantic's "Unable to extract tag using discriminator 'kind'" for a [source] without its
    kind, and "Input should be a valid dictionary or object to extract fields from" for
    `source = "simulated"`, named neither the key to write nor its values."""
    cases = {
        'station_id = "a"\n[source]\npath = "/srv/inbox"\n':
            ("source", 'no kind: [source] needs kind = "camera", "folder", "replay" or "simulated"'),
        'station_id = "a"\n[source]\nkind = "webcam"\n':
            ("source", 'kind = "webcam" is none of "camera", "folder", "replay" or "simulated"'),
        'station_id = "a"\nsource = "simulated"\n':
            ("source", "a section: write it as [source] with its keys on the lines below, not source = ..."),
        MINIMAL + '[mqtt]\ntls = "/etc/ca.pem"\n':
            ("mqtt.tls", "a section: write it as [mqtt.tls] with its keys on the lines below, not tls = ..."),
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(_write(tmp_path, text), environ={})
        assert err.value.errors == [expected], text


def test_validate_config_ok_and_unreadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tls_material: TlsMaterial
) -> None:
    # The example names /etc/smearscope/ca.pem and the models in /var/lib/smearscope/models, which
    # validate-config must find (install-models puts them there): a real CA and models here.
    example = EXAMPLE.read_text().replace("/etc/smearscope/ca.pem", str(tls_material.ca_cert))
    if not Path("/var/lib/smearscope/models/seg.json").exists():  # a machine with no station installed
        assert validate_config_main(_write(tmp_path, example), environ={}) == 78
        assert "analysis.models_dir:" in capsys.readouterr().err
    example = example.replace("/var/lib/smearscope/models", str(REPO / "models"))
    assert validate_config_main(_write(tmp_path, example), environ={}) == 0
    assert "OK" in capsys.readouterr().out
    assert validate_config_main(tmp_path / "missing.toml", environ={}) != 0
    assert validate_config_main(_write(tmp_path, "station_id = \n"), environ={}) != 0
    err = capsys.readouterr().err
    assert "cannot read" in err and "TOML syntax error" in err


def test_the_examples_folder_section_uncommented_beside_the_camera_one_says_which_to_remove(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An engineer switching the example to a watched folder uncomments its folder [source] block,
    leaving the camera's: TOML's bare "Cannot declare ('source',) twice" said neither where the
    first one is nor that the folder's replaces it."""
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# [source]")
    end = next(i for i in range(start, len(lines)) if lines[i] == "#")  # the block's end
    lines[start:end] = [line.removeprefix("# ") for line in lines[start:end]]
    camera_line = lines.index("[source]") + 1
    assert validate_config_main(_write(tmp_path, "\n".join(lines) + "\n"), environ={}) == 78
    err = capsys.readouterr().err
    assert f"[source] is declared already at line {camera_line}; a station has one source" in err, err
    assert "delete (or comment out) the other [source] section" in err, err


def test_unknown_source_kind_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"station_id": "bench", "source": {"kind": "webcam"}}, environ={})
    ((loc, msg),) = err.value.errors
    assert loc == "source" and msg == 'kind = "webcam" is none of "camera", "folder", "replay" or "simulated"'


def test_scale_override_cannot_contradict_the_simulator() -> None:
    with pytest.raises(ConfigError, match="contradicts the simulated source"):
        parse_config({"station_id": "b", "source": {"kind": "simulated"},
                      "analysis": {"microns_per_pixel": 0.1}}, environ={})


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL), environ={})
    with pytest.raises(ValidationError):
        config.station_id = "other"  # type: ignore[misc]


def test_detector_views_reach_the_analyzer_and_bad_views_are_refused(tmp_path: Path) -> None:
    from smearscope.service.station.startup import build_analyzer

    models = REPO / "models"
    base = MINIMAL + f'[analysis]\nengine_backend = "onnxruntime"\nmodels_dir = "{models}"\n'
    default = build_analyzer(load_config(_write(tmp_path, base), environ={}))
    one = build_analyzer(load_config(_write(tmp_path, base + 'detector_views = ["identity"]\n'), environ={}))
    try:
        manifest_views = tuple(default.segmenter.engine.manifest.tta)
        assert default.segmenter.views == manifest_views
        assert one.segmenter.views == ("identity",)
    finally:
        default.close()
        one.close()
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, base + 'detector_views = ["rot90"]\n'), environ={})
    assert err.value.errors[0][0].startswith("analysis.detector_views")


def test_where_the_detector_views_run_reaches_the_analyzer_and_a_bad_band_is_refused(tmp_path: Path) -> None:
    from smearscope.service.station.startup import build_analyzer

    base = MINIMAL + f'[analysis]\nengine_backend = "onnxruntime"\nmodels_dir = "{REPO / "models"}"\n'
    analyzer = build_analyzer(load_config(_write(tmp_path, base + 'detector_views_where = "unsure"\n'
                                                 'detector_unsure_band = [0.3, 0.7]\n'), environ={}))
    try:
        assert analyzer.options.detector_views_where == "unsure"
        assert analyzer.options.detector_unsure_band == (0.3, 0.7)
    finally:
        analyzer.close()
    for bad, key in (('detector_views_where = "sometimes"\n', "detector_views_where"),
                     ("detector_unsure_band = [0.7, 0.3]\n", "detector_unsure_band"),
                     ("detector_unsure_band = [0.2, 1.5]\n", "detector_unsure_band")):
        with pytest.raises(ConfigError) as err:
            load_config(_write(tmp_path, base + bad), environ={})
        assert err.value.errors[0][0] == f"analysis.{key}"


def test_platelet_rescue_is_off_by_default_and_reaches_the_analyzer_and_the_segmenter(tmp_path: Path) -> None:
    from smearscope.service.analysis.platelet_rescue import PlateletRescue
    from smearscope.service.station.startup import build_analyzer

    base = MINIMAL + f'[analysis]\nengine_backend = "onnxruntime"\nmodels_dir = "{REPO / "models"}"\n'
    default = build_analyzer(load_config(_write(tmp_path, base), environ={}))
    on = build_analyzer(load_config(_write(tmp_path, base + "platelet_rescue = true\n"), environ={}))
    try:
        assert default.options.platelet_rescue is None and on.options.platelet_rescue == PlateletRescue()
        # with it, the detector keeps the faint platelets the rule looks at; without, none under its threshold
        assert on.segmenter.platelet_conf_threshold == PlateletRescue().min_score < on.options.detector_conf
        assert default.segmenter.platelet_conf_threshold == default.options.detector_conf
    finally:
        default.close()
        on.close()
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, base + 'platelet_rescue = "sometimes"\n'), environ={})
    assert err.value.errors[0][0] == "analysis.platelet_rescue"


def test_counting_recounted_twins_once_is_on_by_default_and_reaches_the_analyzer(tmp_path: Path) -> None:
    from smearscope.service.analysis.recount_twins import TWIN_MIN_IOU
    from smearscope.service.station.startup import build_analyzer

    base = MINIMAL + f'[analysis]\nengine_backend = "onnxruntime"\nmodels_dir = "{REPO / "models"}"\n'
    default = build_analyzer(load_config(_write(tmp_path, base), environ={}))
    off = build_analyzer(load_config(_write(tmp_path, base + "count_recounted_twins_once = false\n"), environ={}))
    try:
        assert default.options.recounted_twin_min_iou == TWIN_MIN_IOU == 0.5
        assert off.options.recounted_twin_min_iou is None
    finally:
        default.close()
        off.close()


def test_counting_kind_twins_once_is_on_by_default_and_reaches_the_analyzer(tmp_path: Path) -> None:
    from smearscope.service.analysis.kind_twins import CROSS_KIND_MIN_IOU, WHITE_PIECE_MIN_IOU
    from smearscope.service.station.startup import build_analyzer

    base = MINIMAL + f'[analysis]\nengine_backend = "onnxruntime"\nmodels_dir = "{REPO / "models"}"\n'
    default = build_analyzer(load_config(_write(tmp_path, base), environ={}))
    off = build_analyzer(load_config(_write(tmp_path, base + "count_kind_twins_once = false\n"), environ={}))
    try:
        assert (default.options.kind_twin_min_iou, default.options.white_piece_min_iou) == (
            CROSS_KIND_MIN_IOU, WHITE_PIECE_MIN_IOU) == (0.5, 0.3)
        assert (off.options.kind_twin_min_iou, off.options.white_piece_min_iou) == (None, None)
    finally:
        default.close()
        off.close()


def test_head_views_reach_the_heads_and_bad_views_are_refused(tmp_path: Path) -> None:
    from smearscope.service.station.startup import build_analyzer

    models = REPO / "models"
    base = MINIMAL + f'[analysis]\nengine_backend = "onnxruntime"\nmodels_dir = "{models}"\n'
    default = build_analyzer(load_config(_write(tmp_path, base), environ={}))
    set_ = build_analyzer(load_config(_write(tmp_path, base + 'rbc_head_views = ["identity"]\n'
                                             'wbc_head_views = ["identity", "vflip"]\n'), environ={}))
    try:
        assert default.rbc_head.views == tuple(default.rbc_head.engine.manifest.tta)
        assert default.wbc_head.views == tuple(default.wbc_head.engine.manifest.tta)
        assert set_.rbc_head.views == ("identity",)
        assert set_.wbc_head.views == ("identity", "vflip")
    finally:
        default.close()
        set_.close()
    for bad in ('rbc_head_views = ["rot90"]\n', "wbc_head_views = []\n"):
        with pytest.raises(ConfigError) as err:
            load_config(_write(tmp_path, base + bad), environ={})
        assert err.value.errors[0][0].startswith(f"analysis.{bad.split(' ')[0]}")


# --- issue 18, item 7: files the config names, non-UTF-8 files, booleans as numbers ----------


def test_a_missing_or_unusable_tls_ca_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from smearscope.service.station.daemon import run_daemon

    path = _write(tmp_path, MINIMAL + f'[mqtt.tls]\nca_file = "{tmp_path / "missing-ca.pem"}"\n')
    assert validate_config_main(path) == 78
    err = capsys.readouterr().err
    assert "mqtt.tls.ca_file: cannot read" in err
    # what to do next, for a station installed from the example config before its CA was put there
    assert ("No such file or directory: put the certificate of the CA that signed the broker's certificate there "
            f"(PEM; e.g. sudo install -m 0644 clinic-ca.crt {tmp_path / 'missing-ca.pem'})") in err, err
    assert run_daemon(path, 1) == 78  # not a traceback and exit 1 (systemd would restart it)
    assert "mqtt.tls.ca_file" in capsys.readouterr().err
    (tmp_path / "not-a-ca.pem").write_text("hello\n")
    path = _write(tmp_path, MINIMAL + f'[mqtt.tls]\nca_file = "{tmp_path / "not-a-ca.pem"}"\n')
    assert validate_config_main(path) == 78
    assert "no usable CA certificate" in capsys.readouterr().err


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "station.toml"
    path.write_bytes(b'station_id = "b\xe9nch"\n[source]\nkind = "simulated"\n')
    assert validate_config_main(path) == 78
    assert "not UTF-8" in capsys.readouterr().err


def test_a_config_nested_too_deeply_or_not_a_file_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Python's TOML parser recurses (RecursionError at a few thousand brackets), and /dev/zero or a
    FIFO would be read forever: each is a `path: reason` line and exit 78, never a traceback."""
    import os

    deep = _write(tmp_path, MINIMAL + "log_level = " + "[" * 5000 + "]" * 5000 + "\n")
    fifo = tmp_path / "station.fifo"
    os.mkfifo(fifo)  # nobody writes: opening it blocking would wait for ever
    big = tmp_path / "big.toml"
    big.write_text(MINIMAL + "#" * (2 * 1024 * 1024) + "\n")
    for path, says in ((deep, "nested too deeply"), (Path("/dev/zero"), "not a regular file"),
                       (fifo, "not a regular file"), (big, "larger than 1024 KiB")):
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert exc.value.errors == [(str(path), exc.value.errors[0][1])] and says in exc.value.errors[0][1]
        assert validate_config_main(path) == 78
    assert "Traceback" not in capsys.readouterr().err
    # an override from the environment nested as deep is reported against its field
    with pytest.raises(ConfigError) as exc:
        parse_config({"station_id": "b", "source": {"kind": "simulated"}},
                     {"SMEARSCOPE__LOG_LEVEL": "[" * 5000 + "]" * 5000})
    assert [loc for loc, _ in exc.value.errors] == ["log_level"]


def test_folder_timings_that_would_busy_loop_or_never_reject_are_refused(tmp_path: Path) -> None:
    text = (f'station_id = "bench"\n[source]\nkind = "folder"\npath = "{tmp_path}"\npoll_interval_s = 1e-300\n'
            "decode_grace_s = 1e308\nsettle_s = 1e9\nmax_file_mb = 1e6\n")
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, text))
    assert {loc for loc, _ in exc.value.errors} == {"source.poll_interval_s", "source.decode_grace_s",
                                                    "source.settle_s", "source.max_file_mb"}, exc.value.errors


def test_a_config_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "station.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())  # as Windows Notepad saves UTF-8
    assert load_config(path) == load_config(_write(tmp_path, MINIMAL))


def test_an_empty_path_is_an_error_not_the_working_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, MINIMAL + '[review]\ndirectory = ""\n[mqtt.outbox]\npath = " "\n'))
    locs = {loc for loc, _ in exc.value.errors}
    assert {"review.directory", "mqtt.outbox.path"} <= locs, exc.value.errors
    assert all("empty path" in msg for _, msg in exc.value.errors)


def test_a_boolean_is_not_a_number(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, MINIMAL + "[mqtt]\nport = true\nmax_inflight = true\n"))
    assert ("mqtt.port", "expected a number, got the boolean true") in exc.value.errors
    assert any(loc == "mqtt.max_inflight" for loc, _ in exc.value.errors)
    assert load_config(_write(tmp_path, MINIMAL + "[mqtt]\nport = 1884\n")).mqtt.port == 1884
    assert parse_config({"station_id": "b", "source": {"kind": "simulated"}, "mqtt": {}},
                        {"SMEARSCOPE__MQTT__PORT": "1885"}).mqtt.port == 1885


# --- every bound is refused just past it and accepted at it (mutation audit) -------------------

CAMERA = 'station_id = "bench"\n[source]\nkind = "camera"\n'
_SHA = "0" * 64

#: (TOML appended to a camera station's config, the field its error must name; None: it loads).
#: Values just past each documented bound are refused with the field's path; values at it load.
_BOUNDS = [
    ('[analysis]\nmicrons_per_pixel = 0.0099\n', "analysis.microns_per_pixel"),  # 0.01 to 2, as the CLI
    ('[analysis]\nmicrons_per_pixel = 0.01\n', None),
    ('[analysis]\nmicrons_per_pixel = 2.01\n', "analysis.microns_per_pixel"),
    ('[analysis]\nmicrons_per_pixel = 2.0\n', None),
    ('[analysis]\nmicrons_per_pixel = nan\n', "analysis.microns_per_pixel"),  # TOML has nan
    ('microns_per_pixel = 0.000001\n', "source.microns_per_pixel"),  # [source]'s: every field refused as
    ('microns_per_pixel = 5\n', "source.microns_per_pixel"),  # empty or out of focus, once
    ('microns_per_pixel = 2.0\n', None),
    ('[analysis]\ntile_size = 32\n', "analysis.tile_size"),  # a multiple of 32 but under 64
    ('[analysis]\ntile_size = 64\n', None),
    ('[analysis]\ntile_size = 2048\n', None),
    ('[analysis]\ntile_size = 2080\n', "analysis.tile_size"),
    ('[analysis]\ntile_size = 80\n', "analysis.tile_size"),  # a multiple of 16, not of 32
    ('[analysis]\ntile_overlap = 0.5\n', "analysis.tile_overlap"),  # < 0.5
    ('[analysis]\ntile_overlap = 0.49\n', None),
    ('[analysis]\ndetector_unsure_band = [0.5, 0.5]\n', "analysis.detector_unsure_band"),  # low < high
    ('[analysis]\ndetector_unsure_band = [-0.1, 0.5]\n', "analysis.detector_unsure_band"),  # 0 <= low
    ('[analysis]\ndetector_unsure_band = [0.0, 1.0]\n', None),
    ('[analysis]\nmax_lymphocyte_diameter_um = 0\n', "analysis.max_lymphocyte_diameter_um"),  # > 0
    ('[analysis]\nmax_lymphocyte_diameter_um = inf\n', None),  # inf turns the gate off
    ('[analysis]\nconcurrent_fields = 9\n', "analysis.concurrent_fields"),
    ('[analysis]\nconcurrent_fields = 8\n', None),
    ('[analysis]\nbatch_delay_ms = 100.5\n', "analysis.batch_delay_ms"),
    ('[analysis.wbc_open_set]\nthresholds = {}\nmodel_sha256 = "' + _SHA + '"\n', "analysis.wbc_open_set.thresholds"),
    ('[analysis.wbc_open_set]\nthresholds = {energy = 1.0}\nmodel_sha256 = "' + _SHA[:63] + '"\n',
     "analysis.wbc_open_set.model_sha256"),
    ('[analysis.wbc_open_set]\nthresholds = {energy = 1.0}\nmodel_sha256 = "' + _SHA + '"\n', None),
    ('[mqtt]\nqos = 0\n', "mqtt.qos"),  # no acknowledgement: never
    ('[mqtt]\ntopic_prefix = "lab/3"\n', "mqtt.topic_prefix"),
    ('[mqtt]\nkeepalive = 4\n', "mqtt.keepalive"),
    ('[mqtt]\nkeepalive = 5\n', None),
    ('[mqtt]\nmax_packet_size = 4095\n', "mqtt.max_packet_size"),
    ('[mqtt]\nreconnect_min_delay_s = 61\nreconnect_max_delay_s = 60\n', "mqtt"),
    ('[mqtt]\nreconnect_min_delay_s = 60\nreconnect_max_delay_s = 60\n', None),
    ('[mqtt.tls]\nca_file = "/ca.pem"\ncertfile = "/c.pem"\n', "mqtt.tls"),  # without its key
    ('[mqtt.tls]\nca_file = "/ca.pem"\nkeyfile = "/k.pem"\n', "mqtt.tls"),  # a key without its certificate
    ('[mqtt.tls]\nca_file = "/ca.pem"\ncertfile = "/c.pem"\nkeyfile = "/k.pem"\n', None),
    ('[mqtt.outbox]\nmax_bytes = 1023\n', "mqtt.outbox.max_bytes"),
    ('[specimen]\ntarget_wbc_count = 1001\n', "specimen.target_wbc_count"),
    ('[specimen]\ntarget_wbc_count = 1000\n', None),
    ('[specimen]\nidle_timeout_s = 0\n', "specimen.idle_timeout_s"),
    ('[watchdog]\nstall_timeout_s = 4.9\n', "watchdog.stall_timeout_s"),
    ('[watchdog]\nstall_timeout_s = 5\n', None),
    ('[flags]\nmax_unidentified_fraction = 0\n', "flags.max_unidentified_fraction"),
    ('[flags]\nmin_wbc_for_differential = 0\n', "flags.min_wbc_for_differential"),
    ('[review]\ncrop_px = 31\n', "review.crop_px"),
    ('[review]\ncrop_px = 32\n', None),
]


@pytest.mark.parametrize("text,loc", _BOUNDS, ids=[t.replace("\n", " ").strip() for t, _ in _BOUNDS])
def test_each_bound_refuses_the_value_past_it_and_takes_the_value_at_it(tmp_path: Path, text: str, loc: str | None) -> None:
    path = _write(tmp_path, CAMERA + text)
    if loc is None:
        load_config(path, environ={})
        return
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    assert [where for where, _ in exc.value.errors] == [loc], exc.value.errors


def test_a_scale_that_is_not_a_number_is_told_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, CAMERA + "microns_per_pixel = nan\n"), environ={})
    (where, why), = exc.value.errors
    assert where == "source.microns_per_pixel" and "finite number" in why and "less than" not in why


def test_the_scale_override_wins_and_may_repeat_the_simulators_scale(tmp_path: Path) -> None:
    camera = load_config(_write(tmp_path, CAMERA + "microns_per_pixel = 0.2\n[analysis]\nmicrons_per_pixel = 0.11\n"),
                         environ={})
    assert camera.microns_per_pixel == 0.11  # the analysis override, over the source's own
    assert load_config(_write(tmp_path, CAMERA + "microns_per_pixel = 0.2\n"), environ={}).microns_per_pixel == 0.2
    # an override that says what the simulated source renders at contradicts nothing
    sim = parse_config({"station_id": "b", "source": {"kind": "simulated", "microns_per_pixel": 0.1},
                        "analysis": {"microns_per_pixel": 0.1}}, environ={})
    assert sim.microns_per_pixel == 0.1


def test_documented_defaults_of_the_recheck_and_the_calibration_check(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL), environ={})
    assert config.analysis.nucleated_recheck is True  # "Off: every red-cell detection stays a red cell"
    assert config.analysis.max_lymphocyte_diameter_um == 15.0  # the analyzer's own size gate
    assert config.specimen.calibration_check_fields == 3
    assert config.analysis.platelet_rescue is False


def test_a_string_in_the_file_is_not_a_number_but_an_environment_override_is_read_as_one(tmp_path: Path) -> None:
    """`port = "18883"` and `target_wbc_count = "100"` were taken as numbers ("one strict TOML
    file"); an environment variable is text and is read by the field's type."""
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, MINIMAL + '[mqtt]\nport = "18883"\n[specimen]\nidle_timeout_s = "30.5"\n'),
                    environ={})
    assert exc.value.errors == [
        ("mqtt.port", "expected a number, got the string '18883' (write it without quotes)"),
        ("specimen.idle_timeout_s", "expected a number, got the string '30.5' (write it without quotes)")]
    config = load_config(_write(tmp_path, MINIMAL + "[mqtt]\nport = 18883\n"),
                         environ={"SMEARSCOPE__SPECIMEN__IDLE_TIMEOUT_S": "30.5", "SMEARSCOPE__MQTT__PORT": "1890"})
    assert (config.mqtt.port, config.specimen.idle_timeout_s) == (1890, 30.5)


def test_a_boolean_is_not_a_decimal_number_either(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, MINIMAL + "[specimen]\nidle_timeout_s = true\n"), environ={})
    assert exc.value.errors == [("specimen.idle_timeout_s", "expected a number, got the boolean true")]


def test_an_override_setting_a_whole_section_is_named_in_the_errors_inside_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, MINIMAL), environ={"SMEARSCOPE__MQTT__TLS": '{certfile = "/c.pem"}'})
    locs = {loc: msg for loc, msg in exc.value.errors}
    assert "mqtt.tls.ca_file" in locs and "(set by SMEARSCOPE__MQTT__TLS)" in locs["mqtt.tls.ca_file"]


def test_an_override_setting_an_array_is_named_in_the_error_of_its_item(tmp_path: Path) -> None:
    folder = _write(tmp_path, f'station_id = "bench"\n[source]\nkind = "folder"\npath = "{tmp_path}"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(folder, environ={"SMEARSCOPE__SOURCE__EXTENSIONS": '[".png", 3]'})
    ((loc, msg),) = exc.value.errors
    assert loc == "source.extensions[1]" and "(set by SMEARSCOPE__SOURCE__EXTENSIONS)" in msg, msg


def test_files_the_station_would_trip_on_at_start_are_named_by_validate_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each passed validate-config and then stopped the station at start: a folder source's
    state_file that is a directory (a traceback, exit 1: restarted forever) or a FIFO (the start
    hung, deaf to SIGTERM; also the default log in the watched folder, which its writers may
    replace), or a symbolic link (written through), station means that are missing or a directory, a review directory that
    is a file (overlays and gallery lost with warnings only), a replayed video the replay source refuses."""
    inbox, fifo, folder, plain = tmp_path / "inbox", tmp_path / "state.fifo", tmp_path / "adir", tmp_path / "plain"
    for d in (inbox, folder):
        d.mkdir()
    os.mkfifo(fifo)
    plain.write_text("a file\n")
    analysis = f'[analysis]\nmodels_dir = "{REPO / "models"}"\n'
    folder_source = f'[source]\nkind = "folder"\npath = "{inbox}"\n'
    fifo_inbox, linked = tmp_path / "inbox2", tmp_path / "linked"
    fifo_inbox.mkdir()
    os.mkfifo(fifo_inbox / ".smearscope-processed")  # put by whoever writes the folder, in the log's place
    linked.symlink_to(plain)  # written through, the log would overwrite whatever file a link names
    cases = [(folder_source + f'state_file = "{folder}"\n' + analysis, "source.state_file", "not a regular file"),
             (folder_source + f'state_file = "{fifo}"\n' + analysis, "source.state_file", "not a regular file"),
             (folder_source + f'state_file = "{linked}"\n' + analysis, "source.state_file", "symbolic link"),
             (f'[source]\nkind = "folder"\npath = "{fifo_inbox}"\n' + analysis, "source.state_file",
              "not a regular file (a directory, FIFO, device or symbolic link): remove it"),
             (MINIMAL + analysis + f'[review]\ndirectory = "{plain}"\n', "review.directory", "is a file, not a folder")]
    cases += [(MINIMAL + analysis + f'wbc_station_means = "{means}"\n', "analysis.wbc_station_means",
               "station_means_unreadable") for means in (tmp_path / "missing.json", folder)]
    script = tmp_path / "run.avi"  # a script FFmpeg would follow to other files, under a video's name
    script.write_text("ffconcat version 1.0\nfile other.avi\n")
    cases.append((f'[source]\nkind = "replay"\npath = "{script}"\n' + analysis, "source.path",
                  "recording refused: unsupported_format"))
    for text, where, says in cases:
        if not text.startswith("station_id"):
            text = 'station_id = "bench"\n' + text
        assert validate_config_main(_write(tmp_path, text), environ={}) == 78, text
        err = capsys.readouterr().err
        assert any(line.startswith(f"{where}:") and says in line for line in err.splitlines()), (text, err)
    fine = 'station_id = "bench"\n' + folder_source + f'state_file = "{tmp_path / "log"}"\n' + analysis
    assert validate_config_main(_write(tmp_path, fine), environ={}) == 0  # a state file not there yet: made at start


def _sqlite_error(message: str, code: int) -> Exception:
    import sqlite3

    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code  # as SQLite sets it
    return error


def test_a_full_disk_at_start_exits_to_be_restarted_and_a_bad_outbox_path_as_misconfigured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The outbox cannot be opened: on a full disk the station exits 1 (systemd starts it again,
    and the disk may have room by then), not 78, which RestartPreventExitStatus= keeps down for
    good; a path SQLite cannot open stays a config error."""
    import errno
    import sqlite3

    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.station.daemon import run_daemon

    path = _write(tmp_path, MINIMAL + f'[analysis]\nmodels_dir = "{REPO / "models"}"\n[mqtt.outbox]\n'
                  f'path = "{tmp_path / "outbox.sqlite3"}"\n')
    for error, code in ((sqlite3.OperationalError("database or disk is full"), 1),
                        (OSError(errno.ENOSPC, "No space left on device"), 1),
                        (_sqlite_error("disk I/O error", 10 | (4 << 8)), 1),  # SQLITE_IOERR_SHORT_READ
                        (sqlite3.OperationalError("unable to open database file"), 78)):
        def refuse(*args: object, error: Exception = error, **kwargs: object) -> Outbox:
            raise error

        monkeypatch.setattr(Outbox, "from_config", refuse)
        assert run_daemon(path, 1) == code, error
        assert str(error) in capsys.readouterr().err


def test_a_source_that_cannot_be_opened_is_blamed_on_its_field_or_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Opening the source fails: a state_file the OS refuses is source.state_file (78); an I/O error
    on a share or a full disk may pass, so the station exits 1 and systemd starts it again."""
    import errno

    from smearscope.service.station import daemon
    from smearscope.service.station.daemon import run_daemon

    inbox, state = tmp_path / "inbox", tmp_path / "seen.log"
    inbox.mkdir()
    path = _write(tmp_path, f'station_id = "bench"\n[source]\nkind = "folder"\npath = "{inbox}"\n'
                  f'state_file = "{state}"\n[analysis]\nmodels_dir = "{REPO / "models"}"\n'
                  f'[mqtt.outbox]\npath = "{tmp_path / "outbox.sqlite3"}"\n')
    for error, code, field in ((OSError(errno.EISDIR, "Is a directory", str(state)), 78, "source.state_file"),
                               (OSError(errno.EACCES, "Permission denied", str(inbox / "done")), 78, "source.path"),
                               (OSError(errno.EIO, "Input/output error", str(inbox)), 1, None),
                               (OSError(errno.ENOSPC, "No space left on device", str(state)), 1, None)):
        def refuse(*args: object, error: Exception = error, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr(daemon, "open_source", refuse)
        assert run_daemon(path, 1) == code, error
        err = capsys.readouterr().err
        assert (f"{field}:" in err) if field else not any(f"{f}:" in err for f in ("source.path", "source.state_file"))


def test_a_state_file_behind_a_folder_this_user_cannot_enter_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Looking at the state file raises (a folder on its path the service user may not enter; root,
    as tests run, is never refused, so the refusal is the OS's answer played here): validate-config
    names it (the check for a FIFO raised PermissionError: exit 74 here, 1 at start, retried forever)."""
    inbox, state = tmp_path / "inbox", tmp_path / "locked" / "state.log"
    inbox.mkdir()
    real_stat, real_lstat = os.stat, os.lstat

    def refusing(real):  # type: ignore[no-untyped-def]
        def look(path: object, *args: object, **kwargs: object) -> os.stat_result:
            if os.fspath(path) == str(state):  # type: ignore[arg-type]
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)  # type: ignore[no-any-return]
        return look

    monkeypatch.setattr(os, "stat", refusing(real_stat))
    monkeypatch.setattr(os, "lstat", refusing(real_lstat))
    text = (f'station_id = "bench"\n[source]\nkind = "folder"\npath = "{inbox}"\nstate_file = "{state}"\n'
            f'[analysis]\nmodels_dir = "{REPO / "models"}"\n')
    assert validate_config_main(_write(tmp_path, text), environ={}) == 78
    assert any(line.startswith("source.state_file:") and "cannot be looked at" in line
               for line in capsys.readouterr().err.splitlines())


def test_the_station_keeps_no_file_of_its_own_in_the_watched_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A watched folder that also held the outbox (e.g. `path = "/var/lib/smearscope"` with the
    default outbox beside it) passed validate-config; the station then took outbox.sqlite3, its
    -wal and .reserve for a scanner's files and moved them into rejected/ as not_an_image while it
    wrote reports into them: the next start opened an empty outbox, the undelivered reports left
    behind in rejected/. Every file the station keeps or reads (outbox, typed cells, station means,
    TLS files) and the models and review folders must lie elsewhere."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    head = f'station_id = "s1"\n[source]\nkind = "folder"\npath = "{inbox}"\n'
    for section, key, where in (("mqtt.outbox", "path", inbox / "outbox.sqlite3"),
                                ("review", "typed_cells_path", inbox / "typed.sqlite3"),
                                ("analysis", "wbc_station_means", inbox / "means.json"),
                                ("analysis", "models_dir", inbox),
                                ("review", "directory", inbox),
                                ("mqtt.tls", "ca_file", inbox / "ca.pem")):
        with pytest.raises(ConfigError) as err:
            parse_config({"station_id": "s1", "source": {"kind": "folder", "path": str(inbox)},
                          **_nested(section, {key: str(where)})}, environ={})
        assert any(f"{section}.{key}" in msg and "watched folder" in msg for _, msg in err.value.errors), err.value.errors
    text = head + f'[mqtt.outbox]\npath = "{inbox}/outbox.sqlite3"\n'
    assert validate_config_main(_write(tmp_path, text), environ={}) == 78
    assert "mqtt.outbox.path" in capsys.readouterr().err
    # Beside the folder, or in a subfolder of it (never scanned), is fine.
    config = parse_config({"station_id": "s1", "source": {"kind": "folder", "path": str(inbox)},
                           "mqtt": {"outbox": {"path": str(inbox / "state" / "outbox.sqlite3")}}}, environ={})
    assert config.mqtt.outbox.path.parent.name == "state"


def _nested(dotted: str, leaf: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = leaf
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


@pytest.mark.parametrize("host", [
    "mqtt://broker.lab:1883", "mqtts://broker.lab", "ws://broker.lab/mqtt", "broker.lab:8883",
    " broker.lab", "broker.lab\n", "broker lab", "[::1]", "user@broker.lab",
])
def test_a_broker_url_or_a_host_with_a_port_or_spaces_is_refused(
    tmp_path: Path, host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """validate-config said OK to a URL copied from the broker's docs; the station then retried
    "Name or service not known" for ever and doctor only warned the broker does not answer."""
    models = f'[analysis]\nmodels_dir = "{REPO / "models"}"\n'
    good = _write(tmp_path, MINIMAL + models + '[mqtt]\nhost = "broker.lab"\n')
    assert validate_config_main(good, environ={}) == 0
    text = good.read_text().replace('"broker.lab"', '"' + host.replace("\n", "\\n") + '"')
    assert validate_config_main(_write(tmp_path, text), environ={}) == 78
    err = capsys.readouterr().err
    assert err.startswith("mqtt.host: ") and "host name or IP address" in err, err
    with pytest.raises(ConfigError):  # an environment override is read by the same rule
        load_config(_write(tmp_path, MINIMAL), environ={"SMEARSCOPE__MQTT__HOST": host})


@pytest.mark.parametrize("host", ["broker.lab", "broker-1.lab.example", "10.0.0.5", "::1", "fe80::1%eth0",
                                  "localhost", "Broker_2"])
def test_host_names_and_ip_addresses_are_taken(tmp_path: Path, host: str) -> None:
    config = load_config(_write(tmp_path, MINIMAL + f'[mqtt]\nhost = "{host}"\n'), environ={})
    assert config.mqtt.host == host


def test_a_password_file_with_a_byte_order_mark_logs_in_and_one_not_in_utf8_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A password saved by a Windows editor ("UTF-8 with BOM") was sent with the mark, and the
    broker refused it as Not authorized; one saved in Latin-1 ended `smearscope run` with a
    UnicodeDecodeError traceback, exit 1, which systemd restarts every 10 s for ever."""
    from smearscope.service.config.mqtt import MqttConfig
    from smearscope.service.mqtt.credentials import read_password
    from smearscope.service.station.daemon import run_daemon

    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "bom").write_bytes(b"\xef\xbb\xbfs3cret\r\n")
    (creds / "latin1").write_bytes(b"caf\xe9\n")
    bom = MqttConfig.model_validate({"username": "st", "password_credential": "bom"})
    assert read_password(bom, {"CREDENTIALS_DIRECTORY": str(creds)}) == "s3cret"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    path = _write(tmp_path, MINIMAL + f'[analysis]\nmodels_dir = "{REPO / "models"}"\n[mqtt]\nport = 1\n'
                  f'username = "st"\npassword_credential = "latin1"\n[mqtt.outbox]\npath = "{tmp_path / "o.sqlite3"}"\n')
    assert run_daemon(path, 1) == 78
    err = capsys.readouterr().err
    assert "mqtt.password_credential" in err and "not UTF-8" in err and "Traceback" not in err, err


def test_a_drain_on_stop_longer_than_the_units_stop_timeout_allows_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """systemd SIGKILLs the station TimeoutStopSec=45 after the stop began, and the drain is not
    all of a stop: a drain of 40 s was taken and the stop cut (the unit failed, Result: timeout).
    validate-config now refuses more than 30 s, naming the field and the unit's timeout; 30 s is
    taken. The bound's timeout is the one in the unit file systemd runs."""
    from smearscope.service.config.mqtt import STOP_MARGIN_S, UNIT_TIMEOUT_STOP_S

    unit = (REPO / "systemd" / "smearscope.service").read_text()
    assert re.findall(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE) == [str(UNIT_TIMEOUT_STOP_S)] == ["45"]
    assert STOP_MARGIN_S == 15
    models = f'[analysis]\nmodels_dir = "{REPO / "models"}"\n'
    assert validate_config_main(_write(tmp_path, MINIMAL + models + "[mqtt]\nstop_drain_timeout_s = 30\n"),
                                environ={}) == 0
    assert validate_config_main(_write(tmp_path, MINIMAL + models + "[mqtt]\nstop_drain_timeout_s = 40\n"),
                                environ={}) == 78
    err = capsys.readouterr().err
    assert err.startswith("mqtt.stop_drain_timeout_s: ") and "TimeoutStopSec=45" in err and "at most 30" in err, err
    with pytest.raises(ConfigError):  # an environment override is read by the same rule
        load_config(_write(tmp_path, MINIMAL), environ={"SMEARSCOPE__MQTT__STOP_DRAIN_TIMEOUT_S": "30.5"})


@pytest.mark.parametrize(("station_id", "refused"), [
    ("ward 7", "' '"), ("lab/7", "'/'"), ("lab+", "'+'"), ("lab#7", "'#'"), ("läb-7", "'ä'"), ("ward.7 b", "' ' '.'"),
])
def test_a_station_id_with_characters_no_topic_level_may_hold_is_refused_naming_them(
    tmp_path: Path, station_id: str, refused: str,
) -> None:
    """The station id is a level of every topic the station uses ('/' splits a level, '+' and '#'
    are wildcards): refused at validate-config, in words naming the characters, from the file and
    from the environment; one longer than 64 characters by its length; letters, digits, '-' and '_'
    pass."""
    text = MINIMAL.replace('"bench"', json.dumps(station_id, ensure_ascii=False))
    said = (f"{station_id!r} may hold only letters A-Z and a-z, digits, '-' and '_' (it is a level of the station's "
            f"MQTT topics); refused: {refused}")
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), environ={})
    assert err.value.errors == [("station_id", said)]
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, MINIMAL), environ={"SMEARSCOPE__STATION_ID": station_id})
    ((loc, msg),) = err.value.errors
    assert loc == "station_id" and msg.startswith(said) and "SMEARSCOPE__STATION_ID" in msg
    with pytest.raises(ConfigError, match="at most 64 characters"):
        load_config(_write(tmp_path, MINIMAL.replace("bench", "a" * 65)), environ={})
    assert load_config(_write(tmp_path, MINIMAL.replace("bench", "Ward_7-b" + "x" * 56)), environ={}).station_id.startswith("Ward_7")


def test_a_config_not_written_yet_says_where_to_start_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README's first station command, `validate-config /etc/smearscope/station.toml`, on a machine
    with no config there yet: the line names the example to start from, and that example exists
    and validates as a config (once its CA and models are real)."""
    missing = tmp_path / "station.toml"
    assert validate_config_main(missing, environ={}) == 78
    (line, total) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{missing}: cannot read: No such file or directory; ")
    assert "config/station.example.toml" in line and "docs/STATION.md section 3" in line
    assert total == f"{missing}: 1 error(s)"
    named = REPO / re.search(r"(config/\S+\.toml)", line).group(1)
    assert named == EXAMPLE and load_config(named, environ={}).station_id


def test_a_password_written_into_the_config_says_how_the_station_takes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`password = "..."` under [mqtt] (or SMEARSCOPE__MQTT__PASSWORD) is what a deployer writes
    first: the refusal says where the secret goes and which setting names it, not only that [mqtt]
    has no such key; and the secret itself is never echoed."""
    config = _write(tmp_path, MINIMAL + '[mqtt]\nusername = "st1"\npassword = "s3cret-Pw"\n')
    assert validate_config_main(config, environ={}) == 78
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("mqtt.password:")]
    assert "a secret never goes in the config" in line and "s3cret-Pw" not in err
    assert "/etc/smearscope/mqtt-password (root, mode 0600)" in line
    assert 'password_credential = "mqtt-password"' in line and "docs/STATION.md section 4" in line
    # what it says to write is what the unit loads and what the config then accepts
    unit = (REPO / "systemd" / "smearscope.service").read_text()
    assert "LoadCredential=mqtt-password:/etc/smearscope/mqtt-password" in line
    assert "\nLoadCredential=mqtt-password:/etc/smearscope/mqtt-password\n" in unit
    fixed = _write(tmp_path, MINIMAL + '[mqtt]\nusername = "st1"\npassword_credential = "mqtt-password"\n')
    assert load_config(fixed, environ={}).mqtt.password_credential == "mqtt-password"
    with pytest.raises(ConfigError) as env_err:
        load_config(_write(tmp_path, MINIMAL), environ={"SMEARSCOPE__MQTT__PASSWORD": "s3cret-Pw"})
    ((loc, msg),) = env_err.value.errors
    assert loc == "mqtt.password" and "password_credential" in msg and "SMEARSCOPE__MQTT__PASSWORD" in msg
    assert "s3cret-Pw" not in msg


def test_relative_paths_are_said_with_the_file_the_unit_would_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`models_dir = "models"` validated from the repository finds the repository's models and is
    valid; the unit runs from /var/lib/smearscope and would look in /var/lib/smearscope/models. The
    OK comes with a warning naming both folders; an absolute path gets none."""
    unit = (REPO / "systemd" / "smearscope.service").read_text()
    assert "\nWorkingDirectory=/var/lib/smearscope\n" in unit
    monkeypatch.chdir(REPO)
    config = _write(tmp_path, MINIMAL + '[analysis]\nmodels_dir = "models"\n')
    assert validate_config_main(config, environ={}) == 0
    captured = capsys.readouterr()
    assert "OK" in captured.out
    assert captured.err.splitlines() == [
        (f"analysis.models_dir: warning: models is relative: read from the working directory, here {REPO}/models, "
        "but /var/lib/smearscope/models for the systemd unit; write it absolute (docs/STATION.md section 3)")]
    config = _write(tmp_path, MINIMAL + f'[analysis]\nmodels_dir = "{REPO / "models"}"\n')
    assert validate_config_main(config, environ={}) == 0
    assert capsys.readouterr().err == ""


def test_a_setting_written_with_its_words_in_another_order_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`wbc_target` (the status payload's run says `target_wbc`) for [specimen] target_wbc_count, and
    `focus_min` for [quality] min_focus: the same words in another order, which the letter-by-letter
    suggestion missed ("[specimen] has no such setting", nothing more). The setting named is the one
    that then validates."""
    for section, wrong, right, value in (("specimen", "wbc_target", "target_wbc_count", "200"),
                                         ("quality", "focus_min", "min_focus", "20.0")):
        config = _write(tmp_path, MINIMAL + f"[{section}]\n{wrong} = {value}\n")
        assert validate_config_main(config, environ={}) == 78
        assert capsys.readouterr().err.splitlines()[0] == (
            f"{section}.{wrong}: unknown key: [{section}] has no such setting; did you mean {right}?")
        fixed = load_config(_write(tmp_path, MINIMAL + f"[{section}]\n{right} = {value}\n"), environ={})
        assert str(getattr(getattr(fixed, section), right)) == value
    with pytest.raises(ConfigError) as err:  # a single word matches no longer name by its words alone
        load_config(_write(tmp_path, MINIMAL + "[specimen]\nwbc = 1\n"), environ={})
    assert err.value.errors == [("specimen.wbc", "unknown key: [specimen] has no such setting")]


def test_a_config_scale_in_the_wrong_unit_is_refused_with_the_reading_meant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`microns_per_pixel = 72` under [source] (or 13.9 from SMEARSCOPE__ANALYSIS__MICRONS_PER_PIXEL)
    said "Input should be less than or equal to 2": now the unit, the reading meant and what
    measures it, as analyze --microns-per-pixel says; the reading given then validates."""
    camera = 'station_id = "w1"\n[source]\nkind = "camera"\ndevice = 0\nmicrons_per_pixel = {}\n'
    unit = "is outside 0.01..2.0: the scale is in micrometres per pixel, about 0.05 to 0.2 through a 100x oil objective"
    tail = "; smearscope calibrate-scale measures it from a stage micrometer"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, camera.format(72)), environ={})
    assert err.value.errors == [("source.microns_per_pixel",
                                 f"72 {unit} (0.072 if that is nanometres per pixel){tail}")]
    assert load_config(_write(tmp_path, camera.format(0.072)), environ={}).source.microns_per_pixel == 0.072
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, MINIMAL), environ={"SMEARSCOPE__ANALYSIS__MICRONS_PER_PIXEL": "13.9"})
    assert err.value.errors == [("analysis.microns_per_pixel", (f"13.9 {unit} (0.07194 if that is pixels per "
                                 f"micrometre){tail} (set by SMEARSCOPE__ANALYSIS__MICRONS_PER_PIXEL)"))]
    with pytest.raises(ConfigError) as err:  # the simulated source's own range keeps its own words
        load_config(_write(tmp_path, MINIMAL + "microns_per_pixel = 0.9\n"), environ={})
    assert err.value.errors == [("source.microns_per_pixel", "Input should be less than or equal to 0.5")]


def test_the_typed_cells_file_is_not_another_of_the_stations_files(tmp_path: Path) -> None:
    """[review] typed_cells_path naming the outbox or the review folder's gallery.sqlite passed validate-config:
    the station then made its typed-cells table inside that database, and doctor read it as a file of no typed
    cell yet. Refused, naming both settings."""
    outbox, review = tmp_path / "outbox.sqlite3", tmp_path / "review"
    for typed in (outbox, review / "gallery.sqlite"):
        with pytest.raises(ConfigError) as err:
            parse_config({"station_id": "s1", "source": {"kind": "simulated"}, "mqtt": {"outbox": {"path": str(outbox)}},
                          "review": {"directory": str(review), "typed_cells_path": str(typed)}}, environ={})
        assert any("review.typed_cells_path" in msg and "a file of their own" in msg
                   for _, msg in err.value.errors), err.value.errors
    config = parse_config({"station_id": "s1", "source": {"kind": "simulated"}, "mqtt": {"outbox": {"path": str(outbox)}},
                           "review": {"typed_cells_path": str(tmp_path / "typed.sqlite3")}}, environ={})
    assert config.review.typed_cells_path == tmp_path / "typed.sqlite3"


def test_a_password_credential_the_shipped_unit_does_not_load_says_to_add_it_not_to_start_the_unit() -> None:
    """Run from a shell with no $CREDENTIALS_DIRECTORY: the shipped unit loads 'mqtt-password' alone
    (LoadCredential=mqtt-password:/etc/smearscope/mqtt-password), so a config naming another credential
    started by the unit fails the same way. The message said to start the unit, and ran systemd-run with
    that credential's name on the file the unit loads; it names the drop-in to add instead."""
    from smearscope.service.config.mqtt import MqttConfig
    from smearscope.service.mqtt.credentials import CredentialError, read_password

    unit = (REPO / "systemd" / "smearscope.service").read_text()
    assert "LoadCredential=mqtt-password:/etc/smearscope/mqtt-password" in unit
    assert "LoadCredential=broker-pass" not in unit
    shipped = MqttConfig.model_validate({"username": "st", "password_credential": "mqtt-password"})
    with pytest.raises(CredentialError) as said:
        read_password(shipped, {})
    assert "sudo systemctl start smearscope" in str(said.value)
    other = MqttConfig.model_validate({"username": "st", "password_credential": "broker-pass"})
    with pytest.raises(CredentialError) as said:
        read_password(other, {})
    message = str(said.value)
    assert "systemctl start smearscope" not in message, message
    assert "LoadCredential=broker-pass:/etc/smearscope/mqtt-password" not in message, message
    assert ("the shipped unit loads only 'mqtt-password'" in message
            and "LoadCredential=broker-pass:PATH" in message and "sudo systemctl edit smearscope" in message), message
