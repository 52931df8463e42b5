"""gblm's OpenMP default: idle threads sleep (PASSIVE) unless the user chose a wait policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SHOW = "import gblm, os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


@pytest.mark.parametrize(
    ("given", "seen"),
    [
        ({}, "PASSIVE None"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),
        ({"GOMP_SPINCOUNT": "300000"}, "None 300000"),
    ],
)
def test_the_wait_policy_default_keeps_the_users_own(given, seen):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", SHOW], env={**env, **given}, cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert out.stdout.split() == seen.split()
