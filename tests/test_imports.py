"""Every module of fff_jobs imports on its own, in a fresh interpreter: no import circle, and
none works only after another module was imported first."""

from __future__ import annotations

import subprocess
import sys

import pytest

from project import REPO

MODULES = sorted(
    f"fff_jobs.{path.stem}" for path in (REPO / "fff_jobs").glob("*.py") if path.stem != "__init__"
)


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_on_its_own(module: str):
    imported = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
