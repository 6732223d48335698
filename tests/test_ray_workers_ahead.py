"""An embedded Ray's first tasks run on the workers Ray started ahead of them (`pipelines/runtime.py`).

Ray starts a worker per CPU when it starts, with no runtime_env; a job whose runtime_env is not
empty can't use them (ray-project/ray#33621), so the console's worker setup hook is handed to an
embedded Ray through the environment instead. Each test is a fresh Python process with its own
embedded Ray, started as every command starts it.
"""

from conftest import ROOT, fresh_embedded_python

SCRIPT = r"""
import json, os, sys, time, warnings
sys.path.insert(0, {root!r})
import psutil
from pipelines import runtime
runtime.init_ray(num_cpus=2, dashboard=False, ray_data=False)
import ray
from ray._private import ray_constants

raylet = psutil.Process(ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)

def workers():  # the raylet's worker processes (not its agents)
    out = []
    for p in raylet.children():
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "default_worker.py" in cmd or cmd.startswith("ray::IDLE"):
            out.append(p.pid)
    return sorted(out)

deadline = time.time() + 60
while len(workers()) < 2 and time.time() < deadline:  # Ray starts them right after its own start
    time.sleep(0.2)
ahead = workers()
time.sleep(1.0)  # they have registered with the raylet

@ray.remote(num_cpus=1)
def where():
    time.sleep(0.3)  # keeps both workers busy: the four tasks need both
    quiet = any(f[1] is not None and "Setting accelerator" in f[1].pattern for f in warnings.filters)
    return os.getpid(), quiet

ran = ray.get([where.remote() for _ in range(4)])
print("RESULT " + json.dumps({{"ahead": ahead, "ran": ran,
      "env_left": ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR in os.environ}}), flush=True)
"""


def test_the_first_tasks_run_on_the_workers_started_ahead_and_those_run_the_setup_hook(tmp_path):
    _, res = fresh_embedded_python(SCRIPT.format(root=str(ROOT)), tmp_path, "RESULT")
    assert len(res["ahead"]) == 2, res
    pids = {pid for pid, _ in res["ran"]}
    # under a runtime_env Ray starts two more workers for the tasks and kills the two ready ones
    assert pids <= set(res["ahead"]), res
    assert all(quiet for _, quiet in res["ran"]), res  # the console's hook ran in every one of them
    assert not res["env_left"], res  # set only while ray.init starts the node
