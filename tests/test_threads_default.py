"""A run's CPU threads: the CPUs idle at its start (at least one), unless OMP_NUM_THREADS is set."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from gblm import devices
from tests.conftest import ROOT

SHOW = "from gblm.devices import default_threads; print(default_threads())"


def _threads(env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)  # fmt: skip
    return int(out.stdout.split()[-1])


def test_idle_cpus_counts_a_busy_core_as_busy():
    quiet = devices.idle_cpus(0.3)
    assert quiet is not None and 0 <= quiet <= (os.cpu_count() or 1) + 0.01
    # the spinner says when it spins: a sleep could end before a slow interpreter start does
    spin = "print('spinning', flush=True)\nwhile True: pass"
    with subprocess.Popen(
        [sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True
    ) as spinner:
        try:
            assert spinner.stdout.readline() == "spinning\n"
            busy = devices.idle_cpus(0.5)
        finally:
            spinner.kill()  # then the with closes its pipe and waits for it
    assert busy is not None and busy <= (os.cpu_count() or 1) - 0.5  # one core taken


def test_the_default_is_between_one_and_torchs_own_and_keeps_the_users_setting(monkeypatch):
    current, own = torch.get_num_threads(), devices.torch_default_threads()  # own: the cap
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert 1 <= _threads(env) <= (os.cpu_count() or 1)
    assert _threads({**env, "OMP_NUM_THREADS": "1"}) == 1
    monkeypatch.setattr(devices, "idle_cpus", lambda interval=0.2: 0.2)  # a fully busy machine
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert devices.default_threads() == 1
        # the next job of a sweep in this process, on an idle machine again: torch's own count
        monkeypatch.setattr(devices, "idle_cpus", lambda interval=0.2: 64.0)
        assert devices.default_threads() == own
    finally:
        torch.set_num_threads(current)
