"""How a process that started an embedded Ray ends it (`pipelines/runtime.py`).

Each test is a fresh Python process with its own embedded Ray, ended by the interpreter's exit
as every command ends, with Ray's own shutdown watched through the function it calls per process.
"""
import os
import subprocess

from conftest import ROOT, fresh_embedded_python

EXIT_SCRIPT = r"""
import json, sys
sys.path.insert(0, {root!r})
from pipelines import runtime
runtime.init_ray(dashboard=False, ray_data=False)
import ray
from ray._private import node as ray_node
from ray._private import ray_constants

seen = {{}}
kill = ray_node.Node._kill_process_impl
def watched(self, process_type, **kwargs):
    for info in self.all_processes.get(process_type, []):
        seen[process_type] = {{"pid": info.process.pid, "alive": info.process.poll() is None,
                               "returncode": info.process.poll()}}
    kill(self, process_type, **kwargs)
    if process_type == ray_constants.PROCESS_TYPE_MONITOR:
        print("SEEN " + json.dumps(seen), flush=True)
ray_node.Node._kill_process_impl = watched

@ray.remote
def one():
    return 1
assert ray.get(one.remote()) == 1
{tail}
"""


def _run(tmp_path, tail: str = "") -> tuple[subprocess.CompletedProcess, dict]:
    return fresh_embedded_python(EXIT_SCRIPT.format(root=str(ROOT), tail=tail), tmp_path, "SEEN")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too: only its parent's wait is left
        return f.read().split(")")[-1].split()[0] == "Z"


def test_the_monitor_is_ended_before_rays_shutdown_reaches_it(tmp_path):
    # Ray's shutdown stops the GCS, then asks the monitor to stop and waits 1 s for a handler that
    # talks to the GCS; by then our exit hook has killed it, so Ray finds it ended and waits for nothing
    r, seen = _run(tmp_path)
    monitor = seen["monitor"]
    assert "autoscaler" not in r.stderr.lower(), r.stderr[-2000:]  # killed, it reports nothing to the driver
    assert not monitor["alive"] and monitor["returncode"] == -9, seen
    assert seen["raylet"]["alive"], seen  # the rest is Ray's to end, as before
    assert _gone(monitor["pid"]) and _gone(seen["raylet"]["pid"])


def test_a_process_that_shut_ray_down_itself_still_exits_cleanly(tmp_path):
    # ray.shutdown() before the exit: Ray ends the monitor its own way, and the hook finds no node
    r, seen = _run(tmp_path, tail="ray.shutdown()\nprint('SHUT', flush=True)")
    assert seen["monitor"]["alive"], seen  # Ray's own shutdown reached a live monitor
    assert "SHUT" in r.stdout and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _gone(seen["monitor"]["pid"])


PREPROCESS_SCRIPT = r"""
import json, sys
sys.path.insert(0, {root!r})
from pipelines import runtime
from pipelines.corpus import make_corpus
from pipelines.preprocess import preprocess
make_corpus("raw", 12, 2, seed=3)
first = preprocess(["raw"], "out-1", progress=False)
import ray
after_first = ray.is_initialized() or runtime.is_embedded()
runtime.init_ray(dashboard=False, ray_data=False)  # a Ray started first is the job's to use, not to end
second = preprocess(["raw"], "out-2", progress=False)
print("RESULT " + json.dumps({{"written": [first["written"], second["written"]], "after_first": after_first,
                               "after_second": ray.is_initialized() and runtime.is_embedded()}}), flush=True)
"""


def test_a_preprocess_job_ends_the_embedded_ray_it_started_and_keeps_one_started_before(tmp_path):
    r, res = fresh_embedded_python(PREPROCESS_SCRIPT.format(root=str(ROOT)), tmp_path, "RESULT", timeout=300)
    assert res["written"] == [12, 12], res
    assert res["after_first"] is False, res  # ended during the commit, before preprocess returned
    assert res["after_second"] is True, res
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
