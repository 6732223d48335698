"""One `train` per run directory (mmtrain/run_lock.py): a second one is refused in one line
while the first lives; the lock of a driver that died is taken over, and the run says so.
Function-level tests with real second processes here; the same through the CLI on Ray Train
(a second train refused while the first is held, the killed driver's lock taken over by the
same command) rides on the driver-kill run of tests/test_fault_tolerance.py."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from mmtrain import run_lock
from mmtrain.run_lock import LOCK_NAME, STALE_AFTER_S, RunLock, RunLocked

HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from mmtrain.run_lock import RunLock
with RunLock({run!r}):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(run):
    """A real process that takes the lock on `run` and keeps it; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), run=str(run))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_refuses_a_second_one_in_one_line(tmp_path):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(RunLocked) as e:
            RunLock(str(tmp_path)).acquire()
        message = str(e.value)
        assert f"another train is running on {tmp_path} (pid {holder.pid} on " in message and "\n" not in message
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == holder.pid  # the refused attempt left the holder's lock as it was
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_holder_is_taken_over_and_said(tmp_path):
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    said = []
    with RunLock(str(tmp_path), log=said.append) as lock:
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["token"] == lock.token
    assert len(said) == 1 and f"taking over the lock on {tmp_path}" in said[0]
    assert f"pid {holder.pid}" in said[0] and "its process no longer exists" in said[0]
    assert not (tmp_path / LOCK_NAME).exists()  # released at the end
    assert os.listdir(tmp_path) == []  # no stale copy left beside it


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with RunLock(str(tmp_path)):
            assert (tmp_path / LOCK_NAME).exists()
            1 / 0
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(str(tmp_path)):  # and the next run takes it without a takeover
        pass


def write_lock(path, age_s, **owner):
    path.write_text(json.dumps({"host": "other-host", "boot": "x", "pid": 4242, "started": 1.0,
                                "token": "t" * 32, "since": time.time() - age_s, **owner}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_lock_from_another_host_lives_by_its_heartbeat(tmp_path):
    lock = tmp_path / LOCK_NAME
    write_lock(lock, age_s=5)
    with pytest.raises(RunLocked, match="pid 4242 on other-host"):
        RunLock(str(tmp_path)).acquire()
    write_lock(lock, age_s=STALE_AFTER_S + 30)
    said = []
    with RunLock(str(tmp_path), log=said.append):
        pass
    assert "pid 4242 on other-host" in said[0] and "no heartbeat for" in said[0]


def test_a_pid_reused_by_another_process_does_not_hold_the_lock(tmp_path):
    # this host's identity, a live pid (ours), but not the start time of the process that locked
    ident = run_lock._host_identity()
    write_lock(tmp_path / LOCK_NAME, age_s=0, pid=os.getpid(), started=12.5, **ident)
    said = []
    with RunLock(str(tmp_path), log=said.append):
        pass
    assert "its pid now belongs to another process" in said[0]


def test_an_unreadable_lock_file_is_refused_while_young_and_taken_over_when_old(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_bytes(b"")  # a creator that died (or is) between its create and its write
    with pytest.raises(RunLocked, match="starting up"):
        RunLock(str(tmp_path)).acquire()
    os.utime(lock, (time.time() - STALE_AFTER_S - 30,) * 2)
    said = []
    with RunLock(str(tmp_path), log=said.append):
        pass
    assert "unreadable lock file" in said[0]


def test_the_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    with RunLock(str(tmp_path)):
        lock = tmp_path / LOCK_NAME
        os.utime(lock, (1.0, 1.0))  # as if the last beat were long ago
        deadline = time.time() + 60
        while os.stat(lock).st_mtime == 1.0:
            assert time.time() < deadline, "the heartbeat never touched the lock"
            time.sleep(0.05)
