"""The Slurm test harness: a missing or stopped daemon gives a reason, within seconds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from slurm_cluster import PACKAGES, SlurmUnavailableError, start_cluster


def test_a_missing_slurm_is_named_with_the_packages_to_install(tmp_path: Path):
    started = time.monotonic()
    with pytest.raises(SlurmUnavailableError) as reason:
        start_cluster(tmp_path, search_path=str(tmp_path))
    assert time.monotonic() - started < 5
    assert str(reason.value).startswith("Slurm is not installed (munged, slurmctld, slurmd, ")
    assert str(reason.value).endswith(f"missing): apt-get install {PACKAGES} (as root)")
    assert list(tmp_path.iterdir()) == []


def test_a_stopped_daemon_is_named_and_the_rest_stop_within_seconds(tmp_path: Path):
    try:
        cluster = start_cluster(tmp_path)
    except SlurmUnavailableError as reason:
        pytest.skip(f"no Slurm cluster: {reason}")
    controller = cluster.daemons["slurmctld"]
    try:
        cluster.check()
        controller.terminate()
        controller.wait(timeout=10)
        with pytest.raises(SlurmUnavailableError, match=rf"^slurmctld \(pid {controller.pid}\) "):
            cluster.check()
    finally:
        started = time.monotonic()
        cluster.stop()
    assert time.monotonic() - started < 15
    assert all(daemon.poll() is not None for daemon in cluster.daemons.values())
