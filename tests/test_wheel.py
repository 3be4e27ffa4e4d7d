"""The wheel installs one top-level package, `smearscope`, that works away from the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _snapshot(dest: Path) -> Path:
    """The checkout's sources copied aside, so that the wheel's in-tree build (`build/`, the
    egg-info) neither races the other test workers writing under `build/` nor sees their files."""
    skip = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
    shutil.copytree(ROOT, dest, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in skip or n.startswith(".venv")
                                             or n.endswith(".egg-info")])
    return dest


def _pip(*args: str, timeout: float) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], timeout=timeout, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, f"pip {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _build_isolation() -> tuple[str, ...]:
    """The running environment's setuptools builds the wheel when it can (no index needed);
    otherwise pip's isolated build fetches the one pyproject.toml asks for."""
    try:
        import setuptools
    except ImportError:
        return ()
    major = int(setuptools.__version__.split(".")[0])
    return ("--no-build-isolation",) if major >= 68 else ()  # what pyproject.toml [build-system] requires


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, installed (without dependencies) into a folder of its
    own; the dependencies come from the running environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _snapshot(tmp / "src")
    _pip("wheel", "--no-deps", "-q", *_build_isolation(), "-w", str(tmp / "dist"), str(src), timeout=600)
    wheels = list((tmp / "dist").glob("smearscope-*.whl"))
    assert len(wheels) == 1, wheels
    site = tmp / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheels[0]), timeout=300)
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
    assert all((static / f).is_file() for f in ("index.html", "dashboard.js", "review.js", "telemetry.js",
                                                "print.js", "runcontrol.js", "runview.js", "header.js", "dashboard.css",
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


#: The product's folders and where the wheel installs each (pyproject.toml package-dir).
INSTALLED_AS = {"smearscope": "smearscope", "device": "smearscope/device", "engines": "smearscope/engines",
                "export": "smearscope/export", "service": "smearscope/service"}


def test_every_package_of_the_product_is_in_the_wheel(installed: Path, tmp_path: Path) -> None:
    """Each folder of the product holding an __init__.py is installed: a package left out of
    pyproject's list installs without a word and fails at its first import (`smearscope archive`
    did, service/archive missing). The archive's modules import from the installed tree."""
    missing = [f"{top}/{init.parent.relative_to(ROOT / top)}"
               for top, dest in INSTALLED_AS.items() for init in sorted((ROOT / top).rglob("__init__.py"))
               if not (installed / dest / init.relative_to(ROOT / top)).is_file()]
    assert missing == [], f"not in the wheel (add to [tool.setuptools] packages): {missing}"
    out = _run(installed, "import smearscope.service.archive.daemon as d, smearscope.service.archive.query\n"
               "print(d.__file__)\n", cwd=tmp_path)
    assert Path(out.strip()).is_relative_to(installed), out


def test_the_wheel_carries_its_models(installed: Path) -> None:
    models = installed / "smearscope" / "models"
    assert {p.name for p in models.glob("*.json")} >= {"seg.json", "rbc_head.json", "wbc_head.json"}
    assert sum(p.stat().st_size for p in models.glob("*.onnx")) > 20e6


@pytest.fixture(scope="module")
def clean_venv(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with nothing in it but the wheel and what the wheel's metadata asks pip for
    (issue 18, item 12: the wheel alone makes a working analyzer)."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    wheel = next((installed.parent / "dist").glob("smearscope-*.whl"))
    proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True,
                          text=True, timeout=1200, check=False)
    if proc.returncode != 0 and "No matching distribution" in proc.stderr + proc.stdout:
        pytest.skip(f"the package index is not reachable: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return venv


def test_a_clean_venv_analyses_an_image_from_another_directory(clean_venv: Path, tmp_path: Path) -> None:
    import cv2
    import hostile

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    image = tmp_path / "field.png"
    cv2.imwrite(str(image), hostile.smear_like(480, 640, seed=9))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    smearscope = str(clean_venv / "bin" / "smearscope")
    proc = subprocess.run([smearscope, "analyze", str(image), "--json", "--microns-per-pixel", "0.1"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["kind"] == "field" and set(report["models"]) == {"segmentation", "rbc_head", "wbc_head"}
    proc = subprocess.run([smearscope, "doctor"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert "FAIL" not in proc.stdout and "model segmentation" in proc.stdout, proc.stdout
    target = tmp_path / "station-models"
    proc = subprocess.run([smearscope, "install-models", str(target)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and (target / "seg.onnx").is_file(), proc.stdout + proc.stderr


def test_python_310_gets_tomli(installed: Path) -> None:
    """Python 3.10 (JetPack 6) has no tomllib: the config loader needs tomli there."""
    metadata = next(installed.glob("smearscope-*.dist-info")).joinpath("METADATA").read_text()
    requires = [ln for ln in metadata.splitlines() if ln.startswith("Requires-Dist: tomli")]
    assert requires and 'python_version < "3.11"' in requires[0], requires
