"""What reaches the console, and what only the log files get.

Quiet by default: the known-harmless warnings of DeepSpeed, Ray and torch (below, by their
text) are kept off the console and still written to the log file, `RUN/logs/driver.log`;
`--verbose` puts everything on the console too. A real problem (a worker restart, a fallback
to an older checkpoint, quarantined rows) is said by our own code, in one line, and is never
matched here. Everything is done with Python's logging and warnings filters, in this process
(`setup`) and in every Ray worker process of the job (`quiet_worker`, Ray's
`worker_process_setup_hook`): nothing is removed from third-party code.

Where the workers' output goes: an embedded Ray does not forward it to this console
(`log_to_driver=False`, which also keeps Ray's per-worker `(RayTrainWorker pid=...)` prefixed
lines out of the summary); it stays in Ray's per-worker log files, which `keep_worker_logs`
copies into `RUN/logs/workers/`, and what the user must hear reaches the driver through the
training progress board (mmtrain/progress.py). Joined to a cluster, Ray forwards the workers'
output as usual, with the known-harmless warnings filtered in the workers themselves.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import sys
import warnings

# Known-harmless messages, by their text: each is printed by a library on every run (often by
# every worker, or on every call) and says nothing the user can or must act on.
HARMLESS = [re.compile(p) for p in (
    r"Setting accelerator to CPU",                                   # DeepSpeed on a machine without GPUs
    r"Attempting to get learning rate from scheduler before it has started",  # DeepSpeed's warm-up scheduler at step 0
    r"`torch\.distributed\.\w+` is deprecated",                      # torch's FutureWarning on DeepSpeed's collectives
    r"return func\(\*args, \*\*kwargs\)",                            # ... and the source line printed under it
    r"PreemptionWatcher",                                            # Ray Train's actor-restart note (an error-level line)
    r"has constructor arguments in the object store and max_restarts",  # the same note for Ray Data's actors
    r"PYTHON worker processes have been started on node",            # raylet's start-up concurrency note
    r"Token authentication is enabled for this Ray cluster",         # Ray 2.60's default, set on purpose
    r"The argument ``concurrency`` is deprecated",                   # Ray Data's map_batches(concurrency=...)
    r"ExecutionOptions\.exclude_resources` is deprecated",           # Ray Train's own use of a Ray Data option
    r"The minimum number of concurrent actors for .* is set to",     # Ray Data: fewer inputs than actors
    r"Progress bars disabled\. To enable",                           # we disable Ray Data's bars on purpose
    r"^\s*(warnings\.warn\(|self\.exclude_resources = exclude_resources)\s*$",  # source lines under warnings
)]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# loggers of the libraries whose handlers print to the console themselves (they do not propagate)
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "DeepSpeed")

_state = {"verbose": False, "file": None, "forwarded": True}


def harmless(text: str) -> bool:
    return any(p.search(text) for p in HARMLESS)


class KeepHarmlessOff(logging.Filter):
    """On a console handler: drops the known-harmless records (the log file's handler, which
    has no such filter, still gets them). On a logger (`demote`): hands them to the log file
    alone, if there is one."""

    def __init__(self, demote: bool = False):
        super().__init__()
        self.demote = demote

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            keep = not harmless(record.getMessage())
        except Exception:  # a record whose arguments do not format: let logging report it
            return True
        if not keep and self.demote and _state["file"] is not None:
            _state["file"].handle(record)
        return keep


def verbose() -> bool:
    return _state["verbose"]


def setup(log_dir: str | None, verbose: bool = False) -> str | None:
    """The driver's console: warnings go through logging; every record goes to
    `log_dir/driver.log`; the console shows warnings and errors, less the known-harmless ones
    (with `verbose`: INFO and up, all of them). Returns the log file's path. Call it before
    Ray starts, and `refresh` once libraries have set up their own handlers."""
    _state["verbose"] = verbose
    root = logging.getLogger()
    if log_dir is not None and _state["file"] is None:
        os.makedirs(log_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(log_dir, "driver.log"))
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        _state["file"] = handler
    if not any(getattr(h, "_mmtrain_console", False) for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console._mmtrain_console = True
        console.setLevel(logging.INFO if verbose else logging.WARNING)
        console.setFormatter(logging.Formatter("%(message)s"))
        if not verbose:
            console.addFilter(KeepHarmlessOff())
        root.addHandler(console)
    root.setLevel(logging.INFO)
    if not verbose:  # Lance (Rust) says at WARN that a table it is about to create does not exist yet
        os.environ.setdefault("LANCE_LOG", "error")
    logging.captureWarnings(True)  # warnings become records of "py.warnings": file and console
    # DeepSpeed's logger says "Setting accelerator to CPU" while `import deepspeed` runs, before
    # its handler exists: a filter on the logger itself (it keeps it when DeepSpeed configures it)
    _filter_library_loggers(to_console_only=True)
    refresh()
    return _state["file"].baseFilename if _state["file"] is not None else None


def log_only(text: str) -> None:
    """A line for the log file alone (training progress: the console has its own bar or line)."""
    handler = _state["file"]
    if handler is not None:
        handler.handle(logging.LogRecord("mmtrain", logging.INFO, __file__, 0, text, None, None))


def refresh() -> None:
    """Applies the console rules to handlers libraries added since `setup` (Ray's on
    `ray.init`, Ray Data's on `import ray.data`, DeepSpeed's on import), and sends what their
    loggers say to the log file too."""
    if _state["file"] is None and _state["verbose"]:
        return
    for name in [""] + sorted(logging.Logger.manager.loggerDict):
        logger = logging.getLogger(name)
        if not isinstance(logger, logging.Logger):
            continue
        for handler in logger.handlers:
            if _is_console(handler) and not _state["verbose"] and not _has_filter(handler):
                handler.addFilter(KeepHarmlessOff())
        if _state["file"] is not None and logger.handlers and not _reaches_file(logger):
            logger.addHandler(_state["file"])


def _filter_library_loggers(to_console_only: bool) -> None:
    """A logger-level filter on the libraries' loggers. In the driver (`to_console_only`) only
    DeepSpeed's, whose import-time warning comes before its handler exists: the filter hands
    the record to the log file alone."""
    if _state["verbose"]:
        return
    for name in (("DeepSpeed",) if to_console_only else LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        if not _has_filter(logger):
            logger.addFilter(KeepHarmlessOff(demote=True))


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
            and not getattr(handler, "_mmtrain_console", False))


def _has_filter(filterer: logging.Filterer) -> bool:
    return any(isinstance(f, KeepHarmlessOff) for f in filterer.filters)


def _reaches_file(logger: logging.Logger) -> bool:
    """Whether a record of `logger` already reaches the log file's handler (no duplicates)."""
    current = logger
    while current is not None:
        if _state["file"] in current.handlers:
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


# --- the Ray side ----------------------------------------------------------------------------

def ray_init_options(embedded: bool) -> dict:
    """ray.init's options for the workers' output. On an embedded Ray of a command that keeps a
    log folder (`setup` with one: train, demo) it stays in Ray's per-worker log files, whole,
    unless --verbose. Where Ray forwards it to this console (a cluster, or a command without a
    log folder), the known-harmless warnings are filtered in every worker process of the job:
    `worker_setup_hook` names the function for that."""
    forwarded = verbose() or not embedded or _state["file"] is None
    _state["forwarded"] = forwarded
    if not verbose():
        _log_raylet_messages()
    return {"log_to_driver": forwarded}


def worker_setup_hook() -> str | None:
    """The import path of the function every Ray worker of the job runs at its start
    (`quiet_worker`; the workers import this module), or None: where Ray forwards the workers'
    output (as `ray_init_options` decided) and not --verbose. How it reaches the workers is
    `runtime.init_ray`'s choice."""
    return "pipelines.console.quiet_worker" if _state["forwarded"] and not verbose() else None


def _log_raylet_messages() -> None:
    """The raylet's messages to a driver (its start-up concurrency note among them) do not go
    through worker output or logging: Ray's error-message thread prints them with
    `ray._private.worker.print_to_stdstream`, whatever `log_to_driver` says, and offers no hook.
    That function is wrapped so the known-harmless ones become records of the "ray.raylet"
    logger (the log file has them, the console's filter drops them); any other message prints
    as before. A private function: in a Ray without it, or one whose messages have another form,
    they all print unfiltered (the log file says so, once), and nothing else changes."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        ray_worker = None
    original = getattr(ray_worker, "print_to_stdstream", None)
    if not callable(original):
        logging.getLogger(__name__).info("this Ray has no ray._private.worker.print_to_stdstream: the raylet's "
                                         "messages reach the console unfiltered")
        return
    if getattr(original, "_mmtrain_wrapped", False):
        return

    def print_or_log(data, *args, **kwargs):
        try:
            lines = list(data.get("lines") or []) if data.get("pid") == "raylet" else []
            drop = bool(lines) and all(harmless(str(line)) for line in lines)
        except Exception:  # a message of another form than Ray 2.60's: printed as Ray prints it
            drop = False
        if not drop:
            return original(data, *args, **kwargs)
        for line in lines:
            logging.getLogger("ray.raylet").warning("(raylet) %s", line)
        return None

    print_or_log._mmtrain_wrapped = True
    ray_worker.print_to_stdstream = print_or_log


def worker_output_forwarded() -> bool:
    """Whether Ray prints the workers' output on this console (then the driver does not repeat
    what the workers say)."""
    return _state["forwarded"]


def quiet_worker() -> None:
    """Runs at the start of every Ray worker process of a quiet job (worker_process_setup_hook):
    the known-harmless warnings are filtered there, before any library is imported. A worker
    has no log file of its own beyond Ray's, so they are dropped, not demoted."""
    for pattern in HARMLESS:
        warnings.filterwarnings("ignore", message=".*" + pattern.pattern.lstrip("^"))
    _filter_library_loggers(to_console_only=False)
    refresh()  # the console handlers Ray set up in this process


def keep_worker_logs(log_dir: str) -> str | None:
    """Copies the worker log files (stdout and stderr of every task and actor, the training
    workers' among them) from an embedded Ray's session into `log_dir/workers/`.
    Joined to a cluster they are on its nodes: the note file says where."""
    import ray

    from .runtime import is_embedded

    if not ray.is_initialized():
        return None
    os.makedirs(log_dir, exist_ok=True)
    try:
        logs = ray._private.worker._global_node.get_logs_dir_path()  # Ray's session log folder
    except AttributeError:  # a Ray Client connection has no local node
        logs = None
    if not is_embedded() or logs is None:
        with open(os.path.join(log_dir, "workers.txt"), "w") as f:
            f.write("the workers' logs are on the cluster's nodes, in Ray's session logs "
                    "(dashboard: Logs; `ray_job.py logs JOB` for a submitted job)\n")
        return None
    target = os.path.join(log_dir, "workers")
    os.makedirs(target, exist_ok=True)
    # every worker of an embedded Ray is this driver's (those Ray starts ahead of any job too)
    for path in glob.glob(os.path.join(logs, "worker-*")):
        if path.endswith((".out", ".err")):
            try:
                shutil.copyfile(path, os.path.join(target, os.path.basename(path)))
            except OSError as e:  # a copy is a convenience: never the reason a run fails
                logging.getLogger(__name__).info("not copied: %s (%s)", path, e)
    return target


def add_verbose_flag(parser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="also show the libraries' known-harmless warnings, INFO logs and Ray's worker output "
                             "on the console (they always go to RUN/logs/)")
