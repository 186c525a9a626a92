"""What a killed driver left running is ended by recorded PID and start time, never by name; and the
sweeper's own trial checkpoints are replaced whole. Real processes (``sleep``), no Ray."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import psutil
import pytest
import torch

from sweeper import local_ray
from sweeper.checkpoints import TrialCheckpoint
from sweeper.location import LocationError, parse_location


def _dead_process() -> dict:
    done = subprocess.Popen(["true"])
    entry = {"pid": done.pid, "create_time": psutil.Process(done.pid).create_time(), "name": "true"}
    done.wait()
    return entry


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"])


def _record(folder, driver: dict, processes: list[dict], host: str | None = None) -> None:
    data = {"host": host or socket.gethostname(), "driver": driver, "processes": processes}
    (folder / local_ray.PROCESS_FILE).write_text(json.dumps(data))


def _entry(process: subprocess.Popen, **changes) -> dict:
    p = psutil.Process(process.pid)
    return {"pid": p.pid, "create_time": p.create_time(), "name": p.name(), **changes}


def test_a_dead_drivers_recorded_processes_are_ended_and_a_reused_pid_is_not(tmp_path):
    left, reused = _sleeper(), _sleeper()
    try:
        # `reused` has a recorded PID but another start time: the kernel gave the PID to a new process.
        wrong_time = _entry(reused, create_time=_entry(reused)["create_time"] - 100.0)
        _record(tmp_path, _dead_process(), [_entry(left), wrong_time])
        ended = local_ray.end_predecessor(parse_location(tmp_path))
        assert [e["pid"] for e in ended] == [left.pid]
        assert left.wait(timeout=10) is not None
        assert reused.poll() is None
        assert not (tmp_path / local_ray.PROCESS_FILE).exists()
    finally:
        for p in (left, reused):
            p.kill()
            p.wait()


def test_a_live_driver_is_refused_and_nothing_is_ended(tmp_path):
    driver, child = _sleeper(), _sleeper()
    try:
        _record(tmp_path, _entry(driver), [_entry(child)])
        with pytest.raises(LocationError, match=f"being run by process {driver.pid}"):
            local_ray.end_predecessor(parse_location(tmp_path))
        assert driver.poll() is None and child.poll() is None
        # Another machine's record is not ours to act on, whatever its PIDs are here.
        _record(tmp_path, _dead_process(), [_entry(child)], host="elsewhere")
        assert local_ray.end_predecessor(parse_location(tmp_path)) == []
        assert child.poll() is None
    finally:
        for p in (driver, child):
            p.kill()
            p.wait()


def test_the_recorder_records_processes_started_below_the_driver_and_clears_on_exit(tmp_path):
    location = parse_location(tmp_path)
    with local_ray.Recorder(location, fast=0.01):
        child = _sleeper()
        try:
            deadline = time.monotonic() + 10
            recorded: list[int] = []
            while child.pid not in recorded and time.monotonic() < deadline:
                time.sleep(0.02)
                data = json.loads((tmp_path / local_ray.PROCESS_FILE).read_text())
                recorded = [e["pid"] for e in data["processes"]]
            assert child.pid in recorded
            assert data["driver"]["pid"] == psutil.Process().pid
        finally:
            child.kill()
            child.wait()
    assert not (tmp_path / local_ray.PROCESS_FILE).exists()


def _holding(path) -> subprocess.Popen:
    """A process that keeps ``path`` open, as every process of a Ray instance keeps its logs open."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["sh", "-c", 'exec 3>>"$0"; exec sleep 300', str(path)])


def _wait_open(process: subprocess.Popen, path) -> None:
    deadline = time.monotonic() + 10
    while str(path) not in [f.path for f in psutil.Process(process.pid).open_files()]:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_an_unrecorded_process_of_the_dead_drivers_ray_session_is_ended_and_another_sessions_is_not(tmp_path):
    # Spawned in the instant before the kill, a Ray agent is in no record; it still holds its logs open
    # in the session directory the record names. Another instance's (other directory) is left alone.
    dead = _dead_process()
    ours = tmp_path / "ray" / f"session_2026-12-05_10-00-00_000001_{dead['pid']}"
    theirs = tmp_path / "ray" / "session_2026-12-05_10-00-00_000001_1"
    agent, other = _holding(ours / "logs" / "dashboard_agent.log"), _holding(theirs / "logs" / "raylet.out")
    try:
        _wait_open(agent, ours / "logs" / "dashboard_agent.log")
        _wait_open(other, theirs / "logs" / "raylet.out")
        _record(tmp_path, dead, [])
        data = json.loads((tmp_path / local_ray.PROCESS_FILE).read_text())
        (tmp_path / local_ray.PROCESS_FILE).write_text(json.dumps({**data, "ray_session": str(ours)}))
        ended = local_ray.end_predecessor(parse_location(tmp_path))
        assert [e["pid"] for e in ended] == [agent.pid]
        assert agent.wait(timeout=10) is not None
        assert other.poll() is None
    finally:
        for p in (agent, other):
            p.kill()
            p.wait()


def test_the_recorder_names_the_ray_session_directory_of_its_own_driver_only(tmp_path):
    me = psutil.Process().pid
    mine = tmp_path / "ray" / f"session_2026-12-05_10-00-00_000001_{me}"
    other = _holding(tmp_path / "ray" / "session_2026-12-05_10-00-00_000001_1" / "logs" / "gcs_server.out")
    _wait_open(other, tmp_path / "ray" / "session_2026-12-05_10-00-00_000001_1" / "logs" / "gcs_server.out")
    location = parse_location(tmp_path / "sweep")
    (tmp_path / "sweep").mkdir()
    with local_ray.Recorder(location, fast=0.01):
        child = _holding(mine / "logs" / "gcs_server.out")
        try:
            deadline = time.monotonic() + 10
            data: dict = {}
            while data.get("ray_session") is None and time.monotonic() < deadline:
                time.sleep(0.02)
                data = json.loads((tmp_path / "sweep" / local_ray.PROCESS_FILE).read_text())
            assert data["ray_session"] == str(mine)
        finally:
            for p in (child, other):
                p.kill()
                p.wait()


def test_trial_checkpoint_is_replaced_whole_and_ignores_a_killed_writers_temp_file(tmp_path):
    checkpoint = TrialCheckpoint(str(tmp_path), "bundle-abc")
    assert checkpoint.load() is None
    checkpoint.save({"k1": {"epoch": 1, "w": torch.ones(3)}})
    # A writer killed mid-write leaves only its temp file; the reader still sees the last whole state.
    (tmp_path / ".tmp-bundle-abc.pt-dead").write_bytes(b"\x80half a pickle")
    checkpoint.save({"k1": {"epoch": 2, "w": torch.zeros(3)}})
    state = checkpoint.load()
    assert state["k1"]["epoch"] == 2 and torch.equal(state["k1"]["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-bundle-abc.pt-dead", "bundle-abc.pt"]
