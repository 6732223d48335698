"""What a person sees while training: progress lines in a file, a live bar on a terminal (a real
pseudo-terminal), the bar going back when workers restart from a checkpoint, and the console kept
free of the libraries' known-harmless warnings, which still reach RUN/logs/."""
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import ray

from conftest import ROOT
from mmtrain.metrics import read_metric_lines

STEP_LINE = re.compile(r"^step (\d+)/(\d+) epoch \d+ loss (\d+\.\d{4}) samples/s [\d.]+ data wait \d+% ETA [\d:?]+$")


def train_command(data, run):
    # 2 optimizer steps of one worker x 8 samples, a log line at each (the display is fed by rank 0 alone)
    return [sys.executable, str(ROOT / "ray_job.py"), "train", "--data", str(data), "--run-dir", str(run),
            "--max-steps", "2", "--workers", "1", "--batch-size", "8", "--checkpoint-every", "100",
            "--set", "train.log_every=1"]


def test_train_into_a_file_writes_a_step_line_at_each_log_step(small_data, tmp_path):
    run, out = tmp_path / "run", tmp_path / "train.out"
    with open(out, "w") as f:
        r = subprocess.run(train_command(small_data, run), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=900)
    text = out.read_text()
    assert r.returncode == 0, text[-4000:]
    lines = [m for m in (STEP_LINE.match(line) for line in text.splitlines()) if m]
    assert [(int(m[1]), int(m[2])) for m in lines] == [(1, 2), (2, 2)], text[-4000:]
    # the loss shown is rank 0's logged loss at that step
    logged = {rec["step"]: rec["loss"] for rec in read_metric_lines(str(run))}
    assert [float(m[3]) for m in lines] == [round(logged[1], 4), round(logged[2], 4)]
    assert "\r" not in text  # no bar redraws in a file
    driver_log = (run / "logs" / "driver.log").read_text()
    assert "step 1/2 epoch" in driver_log and "step 2/2 epoch" in driver_log


def read_until_exit(proc, fd, timeout):
    """Everything the process writes to the pseudo-terminal until it exits."""
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child side closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks).decode("utf-8", "replace")


def test_train_under_a_terminal_draws_a_bar(small_data, tmp_path):
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    proc = subprocess.Popen(train_command(small_data, tmp_path / "run"), stdin=child, stdout=child, stderr=child,
                            cwd=ROOT, close_fds=True)
    os.close(child)
    try:
        text = read_until_exit(proc, main, timeout=900)
        assert proc.wait(timeout=60) == 0, text[-4000:]
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
    # tqdm redraws one line with carriage returns: the bar at step 0, at the log steps, at the end
    frames = [frame for frame in text.split("\r") if re.match(r"train +\d+%\|", frame)]
    shown = [int(re.search(r"step (\d+)/2", frame)[1]) for frame in frames]
    assert len(frames) >= 3 and shown[0] == 0 and shown[-1] == 2, text[-4000:]
    assert any(re.search(r"step 2/2, epoch \d+ loss \d+\.\d{4} .* ETA ", frame) for frame in frames), text[-4000:]
    assert not any(STEP_LINE.match(line.strip()) for line in text.splitlines())  # the bar, not the lines


def test_the_display_shows_a_restart_going_back_to_its_checkpoint(ray_cluster):
    """A real board actor, records pushed as rank 0 pushes them: a worker group fails after
    step 6 and the next one resumes from the step-4 checkpoint."""
    from mmtrain.progress import ProgressDisplay, progress_board

    board, said = progress_board(f"test-progress-{time.time_ns()}"), []
    now = time.time()

    def step(s):
        return {"kind": "step", "time": now + s, "step": s, "epoch": 0, "loss": 5.0 - s / 10,
                "samples_per_s": 10.0, "data_wait_frac": 0.05}

    broken = {**step(5), "loss": None}  # a record the display cannot show: skipped, and the display goes on
    records = [{"kind": "start", "time": now, "step": 0, "attempt": 0, "resumed": None}, step(2), step(4), broken,
               step(6),
               {"kind": "start", "time": now + 7, "step": 4, "attempt": 1, "resumed": "checkpoint_000000004"},
               step(6), step(8)]
    try:
        with ProgressDisplay(board, 8, log=said.append, interactive=False, poll_s=0.05):
            ray.get([board.push.remote(r) for r in records])
    finally:
        ray.kill(board)
    assert [line.split(" epoch")[0] for line in said if line.startswith("step ")] == \
        ["step 2/8", "step 4/8", "step 6/8", "step 6/8", "step 8/8"]
    restart = [line for line in said if "restarted" in line]
    assert restart == ["training workers restarted (attempt 2): resuming from checkpoint_000000004 at step 4"]
    assert said.index(restart[0]) == 3  # between the first group's last step and the second's first


QUIET_SCRIPT = """
import logging, sys, warnings
sys.path.insert(0, {root!r})
from pipelines import console
console.setup({logs!r}, verbose={verbose})
logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
logging.getLogger("ray.data.some_module").warning("The argument ``concurrency`` is deprecated in Ray 2.51.")
logging.getLogger("mmtrain.anything").warning("a real problem, said once")
"""


def quiet_script(tmp_path, verbose):
    logs = tmp_path / ("verbose" if verbose else "quiet")
    r = subprocess.run([sys.executable, "-c", QUIET_SCRIPT.format(root=str(ROOT), logs=str(logs), verbose=verbose)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr, (logs / "driver.log").read_text()


def test_known_harmless_warnings_stay_off_the_console_and_reach_the_log(tmp_path):
    shown, logged = quiet_script(tmp_path, verbose=False)
    assert shown.strip() == "a real problem, said once", shown
    for said in ("Setting accelerator to CPU", "all_gather_into_tensor", "``concurrency`` is deprecated",
                 "a real problem, said once"):
        assert said in logged, (said, logged)


def test_verbose_shows_them_all(tmp_path):
    shown, logged = quiet_script(tmp_path, verbose=True)
    for said in ("Setting accelerator to CPU", "all_gather_into_tensor", "``concurrency`` is deprecated",
                 "a real problem, said once"):
        assert said in shown and said in logged, (said, shown)


def test_a_quiet_worker_drops_the_known_harmless_warnings_only():
    script = ("import sys, warnings\nsys.path.insert(0, %r)\nfrom pipelines.console import quiet_worker\n"
              "quiet_worker()\n"
              "warnings.warn('`torch.distributed.all_gather_into_tensor` is deprecated. Please use', FutureWarning)\n"
              "warnings.warn('something the user must see', UserWarning)\n" % str(ROOT))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "all_gather_into_tensor" not in r.stderr, r.stderr
    assert "something the user must see" in r.stderr


PLACEMENT_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from mmtrain.progress import progress_board
from pipelines.ingest import epoch_clock
from pipelines.runtime import on_the_drivers_node

cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, dashboard_port={dashboard}))
cluster.add_node(num_cpus=2)
ray.init(address=cluster.address)
cluster.wait_for_nodes()
here = ray.get_runtime_context().get_node_id()

@ray.remote(num_cpus=1)
class Busy:  # holds the driver's node's one CPU, as the data tasks hold a small head's
    def ready(self):
        return True

busy = Busy.options(scheduling_strategy=on_the_drivers_node()).remote()
ray.get(busy.ready.remote())
names = [f"board-{{i}}" for i in range(6)] + [f"clock-{{i}}" for i in range(6)]
actors = [progress_board(n) if n.startswith("board") else epoch_clock(n) for n in names]
ray.get([a.__ray_ready__.remote() for a in actors])
nodes = {{a.name: a.node_id for a in list_actors(address="http://127.0.0.1:{dashboard}", filters=[("state", "=", "ALIVE")])}}
print("placed", json.dumps({{n: nodes.get(n) == here for n in names}}))
ray.shutdown()
cluster.shutdown()
"""


def test_the_board_and_the_clock_live_on_the_drivers_node_even_when_it_is_busy():
    """On a 2-node cluster whose driver's node has no CPU free, Ray's default policy (and a soft
    affinity) put about half of these zero-CPU actors on the other node, whose loss would then
    take the records of the worker groups after it (a 1-to-2 elastic run lost its restart line so)."""
    from conftest import free_port

    script = PLACEMENT_SCRIPT.format(root=str(ROOT), dashboard=free_port())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own cluster, not the session's
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    placed = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("placed "))[7:])
    assert len(placed) == 12 and all(placed.values()), placed


def test_the_run_config_of_a_worker_plan_carries_the_board(tmp_path):
    """The board's name reaches the workers through train_loop_config (plain JSON)."""
    from mmtrain.config import load_run_config
    from mmtrain.worker_plan import WorkerPlan

    cfg = load_run_config(None, data_paths=["x"], run_dir=str(tmp_path / "run"))
    plan = WorkerPlan(run=cfg, deepspeed={}, clock="c", storage="s", per_rank_data=False, epochs_per_pass=1,
                      samples_per_epoch=None, progress="training-progress-1")
    config = plan.to_loop_config(None)
    json.dumps({k: v for k, v in config.items() if k != "storage_options"})
    assert WorkerPlan.from_loop_config(config).progress == "training-progress-1"


def test_the_raylets_known_harmless_messages_go_to_the_log_only(tmp_path):
    """Ray prints the raylet's messages to a driver itself (not through logging): the start-up
    concurrency note is logged instead, any other message still printed."""
    script = ("import sys\nsys.path.insert(0, %r)\nfrom pipelines import console\nconsole.setup(%r)\n"
              "import ray._private.worker as w\nconsole.refresh()\nconsole._log_raylet_messages()\n"
              "w.print_to_stdstream({'lines': ['WARNING: 8 PYTHON worker processes have been started on node: x'], "
              "'pid': 'raylet', 'is_err': False}, ignore_prefix=False)\n"
              "w.print_to_stdstream({'lines': ['the node is out of disk'], 'pid': 'raylet', 'is_err': False}, "
              "ignore_prefix=False)\n" % (str(ROOT), str(tmp_path / "logs")))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "the node is out of disk" in r.stdout + r.stderr and "PYTHON worker processes" not in r.stdout + r.stderr
    assert "PYTHON worker processes have been started" in (tmp_path / "logs" / "driver.log").read_text()


def test_a_ray_without_the_private_print_hook_prints_unfiltered(tmp_path):
    """console wraps Ray's private `print_to_stdstream`: a Ray without it costs the filtering of
    the raylet's messages and one line in the log file, never the command."""
    script = ("import sys\nsys.path.insert(0, %r)\nfrom pipelines import console\nconsole.setup(%r)\n"
              "import ray._private.worker as w\ndel w.print_to_stdstream\n"
              "assert console.ray_init_options(embedded=True) == {'log_to_driver': False}\n"
              "assert not hasattr(w, 'print_to_stdstream')\nprint('went on')\n" % (str(ROOT), str(tmp_path / "logs")))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "went on\n" and r.stderr == "", r.stderr
    assert "no ray._private.worker.print_to_stdstream" in (tmp_path / "logs" / "driver.log").read_text()


def test_asking_for_the_dashboard_of_a_ray_started_without_it_warns(tmp_path):
    """The model jobs start an embedded Ray without the dashboard; a later step in the same
    process that asks for one (Ray Train's state queries need it) gets a warning, not silence."""
    script = ("import logging, sys\nsys.path.insert(0, %r)\nfrom pipelines.runtime import init_ray\n"
              "init_ray(num_cpus=1, dashboard=False, ray_data=False)\n"
              "seen = []\nh = logging.Handler(); h.emit = lambda r: seen.append(r.getMessage())\n"
              "logging.getLogger('pipelines.runtime').addHandler(h)\n"
              "init_ray(dashboard=False, ray_data=False)\nprint(len(seen))\n"
              "init_ray(ray_data=False)\nprint(len(seen), 'dashboard' in seen[-1])\n" % str(ROOT))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray, not the session's
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0 and r.stdout.split("\n")[:2] == ["0", "1 True"], r.stdout + r.stderr[-2000:]
