"""Connecting to Ray: an embedded local instance by default, a cluster when asked."""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time


def local_mode_env() -> None:
    """Keep an embedded Ray on loopback. Must run before `import ray` (read at import).

    Ray otherwise binds a laptop run to the machine's network address; with this switch
    (Ray's own single-machine mode, made for laptops) the node, GCS, dashboard and the
    torch.distributed rendezvous all use 127.0.0.1.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


_embedded = False  # whether init_ray started Ray inside this process
_dashboard = False  # whether that instance runs its dashboard


def is_embedded() -> bool:
    """True if this process runs its own Ray (its resources are fixed: no autoscaler)."""
    return _embedded


def starts_embedded_ray() -> bool:
    """Whether `init_ray()` (no address) would start Ray inside this process: Ray is not up yet
    and RAY_ADDRESS names no cluster. Asked without importing Ray."""
    ray = sys.modules.get("ray")
    return not (ray is not None and ray.is_initialized()) and not os.environ.get("RAY_ADDRESS")


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True,
             dashboard: bool = True, ray_data: bool = True) -> None:
    """Join `address` (or RAY_ADDRESS) if given, else start Ray inside this process.

    `dashboard`: an embedded Ray runs its dashboard (on loopback): Ray Train's state queries
    need it. A step without Ray Train (preprocess, embed, classify, caption, evaluate) passes
    False: no dashboard process and its modules' start-up, a lighter start. `ray_data`: set
    Ray Data's context (importing Ray Data, pandas with it); a step that never builds a Ray
    Data pipeline passes False.
    Joining a cluster ignores `dashboard`: its head decides about its own.

    Idempotent: tests share one Ray instance per session by initializing it first.
    """
    global _embedded, _dashboard
    import ray

    if ray.is_initialized():
        # an instance started earlier keeps its dashboard setting; Ray Data's context is per
        # process and still set where asked
        if dashboard and _embedded and not _dashboard:
            logging.getLogger(__name__).warning(
                "this process's Ray was started without its dashboard by an earlier step; Ray Train's "
                "state queries need one: start Ray with init_ray(dashboard=True) before that step")
        _set_data_context(ray_data)
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    from . import console

    console.refresh()  # Ray's own handler exists since `import ray`: ray.init's warnings pass it
    kwargs: dict = {
        "logging_level": logging.WARNING if quiet else logging.INFO,
        "configure_logging": True,
        **console.ray_init_options(embedded=not address),
    }
    hook = console.worker_setup_hook()
    if address:
        if hook:
            kwargs["runtime_env"] = {"worker_process_setup_hook": hook}
        ray.init(address=address, **kwargs)
    else:
        # address="local": start our own instance, never attach to another one found on the
        # machine; the dashboard stays on loopback
        where = {"dashboard_host": "127.0.0.1"} if dashboard else {}
        with _setup_hook_in_environment(hook, kwargs):
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, **where, **kwargs)
        _embedded, _dashboard = True, dashboard
        atexit.unregister(_kill_embedded_monitor)  # once, however often Ray is started here
        atexit.register(_kill_embedded_monitor)
    _set_data_context(ray_data)
    console.refresh()  # the handlers Ray and Ray Data set up


@contextlib.contextmanager
def _setup_hook_in_environment(hook: str | None, kwargs: dict):
    """Starting an embedded Ray: the worker setup hook (`console.worker_setup_hook`) goes through
    the environment the raylet inherits, which is how Ray itself hands a hook to a worker (the
    variable `default_worker.py` reads), not through the job's runtime_env.

    Why: Ray starts a worker per CPU ahead of the job, with no runtime_env, and a job whose
    runtime_env is not empty can't use them (ray-project/ray#33621): its first tasks wait for two
    more workers to start, while the two ready ones are killed as surplus, on a small machine
    ~0.5 s of its first tasks' time and ~1 CPU-s (benchmarks/README.md, "Ray's workers started
    ahead"). Through the environment every worker of this node, those started ahead included,
    runs the hook at its start, exactly as under a runtime_env. The variable is Ray's private
    name: in a Ray without it (or with it already set) the hook goes into the runtime_env (the
    log file says so). It is set only while ray.init starts the node: the raylet keeps a copy."""
    if hook is None:
        yield
        return
    try:
        from ray._private import ray_constants

        var = ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR
    except (ImportError, AttributeError) as e:
        logging.getLogger(__name__).info("no private name for Ray's worker setup hook (%s): it goes "
                                         "through the runtime_env", e)
        var = None
    if var is None or var in os.environ:
        kwargs["runtime_env"] = {"worker_process_setup_hook": hook}
        yield
        return
    os.environ[var] = hook
    try:
        yield
    finally:
        os.environ.pop(var, None)


# how long Ray's own exit hook waits for the workers' last forwarded output before it disconnects
# (ray/_private/worker.py, `shutdown(_exiting_interpreter=True)`); ending Ray earlier waits as long
_FORWARDED_OUTPUT_GRACE_S = 0.5


def end_embedded_ray_in_background() -> threading.Thread | None:
    """End the embedded Ray this process started, on a thread of its own; returns the thread
    (None where there is no embedded Ray to end). For a step whose last work needs no Ray (a
    preprocess job's commit): Ray's shutdown is mostly waiting (its output grace, its processes'
    ends), which then overlaps that work instead of following it at the exit. Join the thread
    before returning, and start nothing of Ray meanwhile."""
    global _embedded
    import ray

    if not _embedded or not ray.is_initialized():
        return None

    def end() -> None:
        time.sleep(_FORWARDED_OUTPUT_GRACE_S)
        _kill_monitor()
        ray.shutdown()

    _embedded = False  # from here on this process has no Ray; a later init_ray starts a new one
    thread = threading.Thread(target=end, name="end-embedded-ray")
    thread.start()
    return thread


def _kill_embedded_monitor() -> None:
    """At the exit of a process that started an embedded Ray, end Ray's autoscaler monitor before
    Ray's own exit hook runs (atexit runs hooks last-registered first; Ray registers its hook when
    imported). Ray's shutdown stops the GCS first, then sends the monitor SIGTERM, whose handler
    reports its end to that GCS, which is gone; Ray waits 1 s for it and then kills it
    (ray/_private/node.py, `_kill_process_impl`): one second added to every command's end. An
    embedded Ray's resources are fixed, so its monitor has nothing to finish: SIGKILL loses
    nothing, and Ray's shutdown then finds it gone and waits for nothing. The handle is private:
    in a Ray without it Ray's shutdown runs as before (the log file says so)."""
    if _embedded:
        _kill_monitor()


def _kill_monitor() -> None:
    try:
        import ray._private.worker as ray_worker
        from ray._private import ray_constants

        node = ray_worker._global_node
        monitors = [] if node is None else node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])
    except (ImportError, AttributeError) as e:
        logging.getLogger(__name__).info("no handle on Ray's autoscaler monitor (%s): Ray's shutdown ends it", e)
        return
    for info in monitors:
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait()  # SIGKILL: it is gone at once; reaped here, not left to Ray's wait


def _set_data_context(ray_data: bool) -> None:
    if not ray_data:
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # our jobs draw their own progress (in samples, not blocks); Ray Data's per-operator
    # bars would interleave with it
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def on_the_drivers_node():
    """A scheduling strategy that keeps an actor of the driver's (the epoch clock, the progress
    board) on the driver's node: it then lives exactly as long as the run can. Hard, not soft:
    a soft affinity, like Ray's default policy, sends a zero-CPU actor to another node once the
    driver's node has no CPU free (tests/test_console.py), and that node's loss takes the actor's
    state with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
