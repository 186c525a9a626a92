"""What a sweep's driver leaves running on its machine, and ending it when the driver was killed.

A driver SIGKILLed cannot shut its local Ray instance down. Its GCS and raylet follow it, but the raylet's
dashboard and runtime-env agents keep running (observed with Ray 2.60). So the driver records the Ray
processes it started in the sweep directory (``ray_processes.json``), each with its start time so that a
PID the kernel has since reused is never taken for one of them; the next run of the same sweep ends those
still alive before it starts anything, and refuses to start while the recorded driver itself is alive
(two drivers on one sweep would train and log the same trials twice). Processes are found by the PIDs
recorded, never by name: other sweeps' Ray instances on the machine are left alone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from typing import Any

import psutil

from sweeper.location import Location, LocationError

PROCESS_FILE = "ray_processes.json"


def _describe(process: psutil.Process) -> dict[str, Any]:
    return {"pid": process.pid, "create_time": process.create_time(), "name": process.name()}


def _alive(entry: dict[str, Any]) -> psutil.Process | None:
    """The recorded process if it still runs: same PID and the same start time."""
    try:
        process = psutil.Process(entry["pid"])
        if abs(process.create_time() - entry["create_time"]) > 1e-3:
            return None  # the PID was reused
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.Error:
        return None


class Recorder:
    """Keeps the sweep's record of this driver and the processes below it current while the driver runs.

    A background thread looks at the process tree every ``fast`` seconds while Ray starts (the raylet
    spawns its agents within a second of starting) and every ``slow`` seconds afterwards (trial workers),
    and rewrites the record when the set changed. A driver killed within ``fast`` of a spawn leaves that
    process unrecorded; Ray's agents then end on their own when they notice the raylet gone (within 90 s,
    measured)."""

    def __init__(self, sweep_dir: Location, fast: float = 0.02, slow: float = 1.0, fast_for: float = 60.0):
        self.sweep_dir = sweep_dir
        self.fast, self.slow, self.fast_for = fast, slow, fast_for
        self._me = psutil.Process()
        self._known: dict[int, dict[str, Any]] = {}
        self._session: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sweeper-ray-recorder", daemon=True)

    def __enter__(self) -> Recorder:
        self._write()  # the driver itself, before any Ray process exists
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        clear(self.sweep_dir)  # the driver shut its Ray down: nothing recorded is left running

    def _watch(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.fast if time.monotonic() - started < self.fast_for else self.slow):
            if self.poll():
                self._write()

    def poll(self) -> bool:
        """Add processes below the driver not seen yet, and its Ray session directory once a process
        holds a file in it; True when anything was added."""
        new = False
        children = self._me.children(recursive=True)
        for child in children:
            if child.pid in self._known:
                continue
            try:
                self._known[child.pid] = _describe(child)
                new = True
            except psutil.Error:
                continue  # ended while we looked
        for child in children if self._session is None else ():
            try:
                self._session = session_dir(child, self._me.pid)
            except psutil.Error:
                continue
            if self._session is not None:
                new = True
                break
        return new

    def _write(self) -> None:
        data = {
            "host": socket.gethostname(),
            "driver": _describe(self._me),
            "processes": list(self._known.values()),
            "ray_session": self._session,
        }
        try:
            self.sweep_dir.write_text(PROCESS_FILE, json.dumps(data, indent=1))
        except OSError:
            pass  # a store that failed once is written again at the next change


def session_dir(process: psutil.Process, driver_pid: int) -> str | None:
    """The Ray session directory ``process`` holds a file open in, if the driver ``driver_pid`` started it."""
    pattern = re.compile(rf"^(.*/session_[^/]*_{driver_pid})/")
    for opened in process.open_files():
        match = pattern.match(opened.path)
        if match:
            return match.group(1)
    return None


def _holding_files_in(folder: str) -> list[psutil.Process]:
    """Processes on this machine with a file open under ``folder`` (those we may look at)."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if any(f.path.startswith(folder + "/") for f in process.open_files()):
                found.append(process)
        except psutil.Error:
            continue  # another user's process, or ended while we looked
    return found


def clear(sweep_dir: Location) -> None:
    try:
        sweep_dir.remove(PROCESS_FILE)
    except OSError:
        pass


def end_predecessor(sweep_dir: Location, timeout: float = 5.0) -> list[dict[str, Any]]:
    """End what a killed earlier driver of this sweep left running on this machine; return what was ended.

    Raises LocationError while that driver is still alive."""
    if not sweep_dir.exists(PROCESS_FILE):
        return []
    try:
        data = json.loads(sweep_dir.read_text(PROCESS_FILE))
    except (OSError, ValueError):
        return []  # unreadable: a driver killed mid-write wrote nothing we could trust
    if data.get("host") != socket.gethostname():
        return []  # another machine's processes are not ours to end
    driver = data["driver"]
    if driver["pid"] != os.getpid() and _alive(driver) is not None:
        raise LocationError(
            f"sweep '{sweep_dir}' is being run by process {driver['pid']} on this machine; "
            "wait for it to end or stop it before running the sweep again"
        )
    found = [(entry, _alive(entry)) for entry in data["processes"]]
    found = [(entry, process) for entry, process in found if process is not None]
    if data.get("ray_session"):
        pids = {process.pid for _, process in found}
        for process in _holding_files_in(data["ray_session"]):
            if process.pid not in pids:
                try:
                    found.append((_describe(process), process))
                except psutil.Error:
                    pass
    for _, process in found:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs([p for _, p in found], timeout=timeout)
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=timeout)
    clear(sweep_dir)
    return [entry for entry, _ in found]
