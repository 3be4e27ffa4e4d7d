"""The wheel installs one top-level package, `smearscope`, that works away from the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, installed (without dependencies) into a folder of its
    own; the dependencies come from the running environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(ROOT)],
                   check=True, timeout=600, capture_output=True)
    wheels = list((tmp / "dist").glob("smearscope-*.whl"))
    assert len(wheels) == 1, wheels
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheels[0])], check=True, timeout=300, capture_output=True)
    return site


def _run(site: Path, code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_one_top_level_package(installed: Path) -> None:
    names = {p.name for p in installed.iterdir() if p.name not in ("bin", "__pycache__")}
    assert {n for n in names if not n.endswith(".dist-info")} == {"smearscope"}
    wheel = next((installed.parent / "dist").glob("smearscope-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"smearscope"}, tops
    assert {"analysis", "config", "ingest", "mqtt", "station"} <= {
        p.name for p in (installed / "smearscope" / "service").iterdir() if p.is_dir()}
    assert (installed / "smearscope" / "service" / "analysis" / "data" / "stain_reference.json").is_file()
    static = installed / "smearscope" / "service" / "dashboard" / "static"
    assert all((static / f).is_file() for f in ("index.html", "dashboard.js", "dashboard.css",
                                                "vendor/mqtt.min.js", "vendor/mqtt.LICENSE.md"))
    assert not (installed / "smearscope" / "training").exists() and not (installed / "training").exists()


def test_the_installed_package_imports_and_runs_from_elsewhere(installed: Path, tmp_path: Path) -> None:
    out = _run(installed, (
        "import numpy as np\n"
        "import smearscope.service.analysis.pipeline as pipeline\n"
        "import smearscope.service.station.daemon, smearscope.cli, smearscope.export.onnx_export\n"
        "from smearscope.service.analysis.stain import create_normalizer\n"
        "create_normalizer('macenko').normalize(np.full((64, 64, 3), 200, np.uint8))\n"
        "print(pipeline.__file__)\n"), cwd=tmp_path)
    assert Path(out.strip()).is_relative_to(installed), out
    schema = _run(installed, "import sys\nfrom smearscope.cli import main\nsys.exit(main(['schema']))\n", cwd=tmp_path)
    assert '"title": "Report"' in schema
