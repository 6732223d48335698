"""The shards a preprocess job works on while its embedded Ray starts (`startup_shards.py`).

The child is real (forked from this process); its shards are real tars through the real
`process_shards`. The filesystem below is a test-only local one whose opens kill the opener,
sleep or fail by file name: the child's death, a shard taken back, and a shard it raised on.
"""
import json
import os
import subprocess
import sys
import time

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from conftest import ROOT
from pipelines.config import DataConfig
from pipelines.corpus import make_corpus
from pipelines.startup_shards import StartupShards


class TrapFileSystem(LocalFileSystem):
    protocol = ("traptest",)

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if "r" in mode and "-kill" in path:
            os.kill(os.getpid(), 9)
        if "r" in mode and "-refused" in path:
            raise PermissionError(13, "Access Denied", path)  # what a store's refusal looks like
        if "r" in mode and "-sleep" in path:
            time.sleep(120)
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("traptest", TrapFileSystem, clobber=True)

# the test process has lance loaded by other test modules, and lance warns at every fork; the
# child runs shard tasks only (no lance), as it does under a preprocess driver, which never loads it
pytestmark = pytest.mark.filterwarnings("ignore:lance is not fork-safe")


def corpus(tmp_path, names):
    raw = tmp_path / "raw"
    make_corpus(str(raw), 3 * len(names), len(names), seed=5)
    for i, name in enumerate(names):
        (raw / f"shard-{i:06d}.tar").rename(raw / name)
    return [(f"traptest://{raw / n}", f"shard-{i:06d}.tar") for i, n in enumerate(names)]


def job(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return out, (str(out), {}, "t3st", DataConfig().to_dict())


def reap(early, shards, timeout=60):
    """Wait for the child to exit, then everything it reported."""
    deadline = time.time() + timeout
    finished, returned = [], []
    while early.busy() and time.time() < deadline:
        early.wait(0.1)
        if early._claimed is not None:
            f, r = early.collect()
            finished += f
            returned += r
        elif not early._proc.is_alive():
            early.stop()
    assert not early.busy(), "the child never exited"
    return finished, returned


def test_left_alone_the_child_does_every_shard_and_exits(tmp_path):
    shards = corpus(tmp_path, ["a.tar", "b.tar", "c.tar"])
    out, args = job(tmp_path)
    early = StartupShards(shards, args)
    finished, returned = reap(early, shards)
    assert early.stop() == 3 and returned == [] and early.finished == 3
    assert sorted(s["shard"] for s in finished) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for _, name in shards:
        assert (out / "_parts" / name.replace(".tar", ".done.json")).exists()


def test_a_shard_that_kills_the_child_costs_one_attempt_and_the_rest_stay_unclaimed(tmp_path):
    shards = corpus(tmp_path, ["a.tar", "b-kill.tar", "c.tar", "d.tar"])
    out, args = job(tmp_path)
    early = StartupShards(shards, args)
    early._proc.join(60)
    assert early._proc.exitcode == -9
    assert early.stop() == 2  # a, and b that it died on; c and d are Ray's
    finished, returned = reap(early, shards)
    assert [s["shard"] for s in finished] == ["shard-000000.tar"]
    assert returned == [(1, 1)]  # b: one attempt spent
    assert not (out / "_parts" / "shard-000001.done.json").exists()


def test_a_shard_the_child_raised_on_goes_back_untried_and_the_child_goes_on(tmp_path):
    shards = corpus(tmp_path, ["a.tar", "b-refused.tar", "c.tar"])
    out, args = job(tmp_path)
    early = StartupShards(shards, args)
    early._proc.join(60)
    assert early._proc.exitcode == 0
    assert early.stop() == 3
    finished, returned = reap(early, shards)
    assert returned == [(1, 0)] and len(finished) == 2


def test_a_shard_taken_back_is_returned_untried_at_once(tmp_path):
    shards = corpus(tmp_path, ["a-sleep.tar", "b.tar"])
    out, args = job(tmp_path)
    early = StartupShards(shards, args)
    time.sleep(1.0)  # it is asleep in a's open
    assert early.stop() == 1 and early.in_flight() == 1
    t0 = time.time()
    early.take_back()
    finished, returned = reap(early, shards)
    assert time.time() - t0 < 30
    assert finished == [] and returned == [(0, 0)]  # not a crash: the job's own decision


DIES = '''
import sys, os
sys.path.insert(0, sys.argv[2])
import test_startup_shards as t
from pipelines.startup_shards import StartupShards
from pipelines.config import DataConfig
early = StartupShards([("traptest://" + sys.argv[1], "shard-000000.tar")], (sys.argv[3], {}, "t", DataConfig().to_dict()))
print(early._proc.pid, flush=True)
os._exit(3)
'''


def test_the_child_dies_with_the_driver(tmp_path):
    shards = corpus(tmp_path, ["a-sleep.tar"])
    (tmp_path / "out").mkdir()
    run = subprocess.run([sys.executable, "-c", DIES, shards[0][0].removeprefix("traptest://"),
                          str(ROOT / "tests"), str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 3, run.stderr[-2000:]
    child = int(run.stdout.split()[0])
    deadline = time.time() + 30
    while time.time() < deadline and os.path.exists(f"/proc/{child}") and _state(child) != "Z":
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or _state(child) == "Z"


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


RUN = '''
import json, sys
from pipelines.runtime import local_mode_env
local_mode_env()
from pipelines.preprocess import preprocess
stats = preprocess([sys.argv[1]], sys.argv[2], progress=False, startup_shards=sys.argv[3] == "1")
print(json.dumps(stats["this_run"]))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_job_whose_first_shards_ran_while_ray_started_writes_the_same_output(tmp_path):
    """Byte for byte the output of the same job without the child (timings aside), and the
    child did some of the shards: an embedded Ray takes seconds to start, a shard milliseconds."""
    raw = tmp_path / "raw"
    make_corpus(str(raw), 60, 12, seed=8)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray
    runs = {}
    for mode in ("1", "0"):
        run = subprocess.run([sys.executable, "-c", RUN, str(raw), str(tmp_path / f"out{mode}"), mode],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
        runs[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    assert runs["0"]["startup_shards"] == 0
    assert 1 <= runs["1"]["startup_shards"] <= 12 and runs["1"]["processed_shards"] == 12
    from test_preprocess import comparable, files_of

    with_child, without = files_of(tmp_path / "out1"), files_of(tmp_path / "out0")
    names = sorted(n for n in without if not n.startswith("_lock"))
    assert sorted(n for n in with_child if not n.startswith("_lock")) == names
    for n in names:
        assert comparable(with_child[n]) == comparable(without[n]), n
