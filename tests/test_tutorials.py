"""The tutorials (tutorials/*.py) run in smoke mode and save their figure, and every page
shows its script's output and figure.

Running all six in smoke mode takes about 50 s on one core (measured 4-11 s each), more than
the default suite's budget, so the runs are marked slow (``pytest -m slow
tests/test_tutorials.py``); the checks of the pages are fast.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "tutorials").glob("*.py"))
PAGES = ROOT / "docs" / "tutorials"


def test_every_tutorial_has_a_page_with_output_and_figure():
    assert len(SCRIPTS) >= 6, SCRIPTS
    for script in SCRIPTS:
        page = PAGES / f"{script.stem}.rst"
        assert page.exists(), f"{script.name} has no page {page}"
        text = page.read_text(encoding="utf-8")
        assert f".. plot:: {script.name}" in text, f"{page.name} does not draw {script.name}"
        assert "Output (smoke-test sizes" in text, f"{page.name} does not show the output"
        assert "run it to see" not in text
        assert script.stem in (PAGES / "index.rst").read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_tutorial_runs_in_smoke_mode_and_saves_its_figure(script, tmp_path):
    figure = tmp_path / f"{script.stem}.png"
    # the package from this checkout, small sizes (CI), no display, one thread
    env = dict(os.environ, CI="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(script), str(figure)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "figure saved to" in done.stdout
    # a PNG, not an empty file
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000
