"""Every script the dashboard page loads parses (node --check): a syntax error in one file stops the
whole page, and the browser tests then fail only by timing out on what the page never drew."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

STATIC = Path(__file__).resolve().parents[1] / "service" / "dashboard" / "static"
NODE = shutil.which("node")


def _scripts() -> list[Path]:
    return sorted(p for p in STATIC.glob("*.js"))


def test_the_page_loads_every_script_of_the_folder() -> None:
    html = (STATIC / "index.html").read_text()
    missing = [p.name for p in _scripts() if f'src="{p.name}"' not in html]
    assert _scripts() and missing == [], f"scripts in {STATIC} the page does not load: {missing}"


@pytest.mark.skipif(NODE is None, reason="node is not installed (the browser tests still load every script)")
@pytest.mark.parametrize("script", _scripts(), ids=lambda p: p.name)
def test_each_dashboard_script_parses(script: Path) -> None:
    done = subprocess.run([str(NODE), "--check", str(script)], check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
