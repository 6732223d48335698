"""MLflow tracking of a run (`train --mlflow URI`), beside RUN/metrics.jsonl and TensorBoard.

The driver starts the MLflow run, or continues the one RUN/mlflow.json records (a re-run of
`train` on RUN resumes it by its id), and at the end logs the exported model, the metrics plot
and the run config as artifacts (`tracked`). Rank 0 logs the run config as parameters and the
metrics of every log step, the same keys and values it writes to RUN/metrics.jsonl
(`MlflowMetrics`). `evaluate` logs its results into the run the model came from
(`log_evaluation`), and `export` and `plot` run on their own log the file they write (`log_output`).

Tracking never stops training: a tracking server that is down or fails costs one warning line,
and the run goes on without MLflow (the driver: for the whole run; rank 0: for the rest of its
attempt, since every later call would stall a training step for the request timeout; the
metrics stay in RUN/metrics.jsonl). Every failure of the tracking client counts, not only
network errors: whatever MLflow raises, training is what the user asked for.

`mlflow` is imported only when a run is tracked: it costs seconds to import.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

from pipelines.errors import UserError

RECORD = "mlflow.json"           # in the run directory: {"tracking_uri", "experiment_id", "run_id"}
EXPERIMENT = "mmtrain"           # the experiment runs go to, unless MLFLOW_EXPERIMENT_NAME names another
MAX_PARAM_CHARS = 6000           # MLflow's limit on a parameter's value
MAX_PARAMS_PER_BATCH = 100       # MLflow's limit on parameters per log_batch call
# MLflow's own defaults retry a failing request for about 4 minutes (7 retries, 120 s timeout):
# a tracking server that is down would stall the start, or a training step, that long
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tracking_uri(text: str) -> str:
    """An MLflow tracking URI: a local folder (or file: URI) as an absolute file: URI, since the
    workers run in other directories; http(s)://, sqlite:// and others as given. A URI that
    carries a password is refused: it would be saved in RUN/mlflow.json and the run config."""
    text = str(text).strip()
    parts = urlsplit(text)
    if parts.scheme in ("", "file"):
        path = parts.path if parts.scheme == "file" else text
        return "file://" + os.path.abspath(os.path.expanduser(path))
    if parts.password:
        raise UserError(f"the MLflow URI {parts.scheme}://{parts.hostname}... carries a password: give it in "
                        f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")
    return text


def client_for(uri: str):
    """An MlflowClient on `uri`, with short HTTP retries unless the environment sets them."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if uri.startswith("file:"):
        # MLflow 3 keeps its folder store in maintenance mode behind this opt-in; a folder is what
        # a user without a server or database asks for (sqlite:///... is a database store)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def read_record(folder: str) -> dict | None:
    """RUN/mlflow.json: where the run is tracked; None when it is not."""
    path = os.path.join(folder, RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


# --- the driver -------------------------------------------------------------------------------

@contextmanager
def tracked(cfg, log=print):
    """Around the training of `cfg`: yields the config to train with, its train.mlflow the
    tracking URI (--mlflow, else the one RUN/mlflow.json records), or None when the run is not
    tracked or the tracking store cannot be reached (one warning line). On success the model,
    plot and run config go to the MLflow run as artifacts and it ends FINISHED; FAILED (KILLED on
    Ctrl-C) when training raises."""
    record = read_record(cfg.run_dir) or {}
    uri = cfg.train.mlflow or record.get("tracking_uri")
    if not uri:
        yield cfg
        return
    uri = tracking_uri(uri)
    try:
        client, run_id = _start(cfg.run_dir, uri, record, log)
    except Exception as e:  # whatever the tracking client raises: training goes on (module docstring)
        log(f"warning: MLflow at {uri} failed ({one_line(e)}): training goes on without MLflow tracking")
        yield cfg.replace(train={"mlflow": None})
        return
    try:
        yield cfg.replace(train={"mlflow": uri})
    except BaseException as e:
        _end(client, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", log)
        raise
    _log_outputs(client, run_id, cfg, log)
    _end(client, run_id, "FINISHED", log)


def _start(run_dir: str, uri: str, record: dict, log) -> tuple:
    """The MLflow run: the recorded one when it is in this store, else a new one; recorded in
    RUN/mlflow.json."""
    client = client_for(uri)
    run = None
    if record.get("tracking_uri") == uri and record.get("run_id"):
        try:
            run = client.get_run(record["run_id"])
        except Exception as e:
            if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
            log(f"MLflow run {record['run_id']} is gone from {uri}: a new run")
    if run is not None:
        client.update_run(run.info.run_id, status="RUNNING")
        log(f"MLflow: continuing run {run.info.run_id} at {uri}")
    else:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run = client.create_run(experiment_id, run_name=os.path.basename(os.path.abspath(run_dir)),
                                tags={"run_dir": os.path.abspath(run_dir)})
        log(f"MLflow: run {run.info.run_id} in experiment {name!r} at {uri}")
    with open(os.path.join(run_dir, RECORD), "w") as f:
        json.dump({"tracking_uri": uri, "experiment_id": run.info.experiment_id, "run_id": run.info.run_id}, f,
                  indent=1)
    return client, run.info.run_id


def _log_outputs(client, run_id: str, cfg, log) -> None:
    """The exported model (RUN/model.safetensors), the metrics plot and the run config as the
    run's artifacts. A run with no checkpoint or no metrics logs what it has."""
    from .export import export
    from .metrics import plot_run

    run_dir = cfg.run_dir
    outputs = []
    model = os.path.join(run_dir, "model.safetensors")
    try:
        export(run_dir, model, storage_options=cfg.storage_options or None)
        outputs.append((model, "model"))
    except (UserError, FileNotFoundError) as e:
        log(f"MLflow: no model to log ({e})")
    try:
        outputs.append((plot_run(run_dir), None))
    except UserError as e:
        log(f"MLflow: no plot to log ({e})")
    outputs.append((os.path.join(run_dir, "run_config.json"), None))
    try:
        for path, folder in outputs:
            if os.path.exists(path):
                client.log_artifact(run_id, path, folder)
    except Exception as e:  # the run is trained: a tracking failure is a warning (module docstring)
        log(f"warning: MLflow could not store the run's artifacts ({one_line(e)})")


def _end(client, run_id: str, status: str, log) -> None:
    try:
        client.set_terminated(run_id, status)
    except Exception as e:
        log(f"warning: MLflow could not mark run {run_id} {status} ({one_line(e)})")


# --- rank 0 -----------------------------------------------------------------------------------

class MlflowMetrics:
    """Rank 0's metrics writer (metrics.MetricsWriter) with the MLflow run beside it: every
    logged step goes to both, the same keys and values (TensorBoard's: the finite numbers)."""

    def __init__(self, writer, client, run_id: str, say=None):
        self.writer, self.client, self.run_id, self.say = writer, client, run_id, say or to_stderr

    @classmethod
    def attach(cls, worker) -> "MlflowMetrics | None":
        """On rank 0 of a tracked run: logs the run config as parameters and puts itself in
        place of `worker.writer`. None elsewhere."""
        uri = worker.cfg.train.mlflow
        record = read_record(worker.cfg.run_dir) if worker.rank == 0 and uri else None
        if not record or record.get("tracking_uri") != uri:
            return None
        tee = cls(worker.writer, None, record["run_id"])
        try:
            tee.client = client_for(uri)
        except Exception as e:
            tee.failed(e)
            return None
        tee.log_params(worker.plan.run.to_public_dict())  # the plan's config holds no credentials
        worker.writer = tee
        return tee

    def log_params(self, config: dict) -> None:
        """The flattened run config. MLflow keeps a parameter's first value: a resumed run whose
        settings changed says which, once (RUN/run_config.json has the new ones)."""
        from mlflow.entities import Param

        flat = flattened(config)
        try:
            logged = self.client.get_run(self.run_id).data.params
            new = [Param(k, v) for k, v in flat.items() if k not in logged]
            for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=new[i:i + MAX_PARAMS_PER_BATCH])
        except Exception as e:
            self.failed(e)
            return
        changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != v)
        if changed:
            self.say(f"MLflow keeps the first value of {', '.join(changed)}; RUN/run_config.json has this attempt's")

    def log(self, step: int, values: dict) -> None:
        self.writer.log(step, values)
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # rounded as metrics.jsonl rounds them, so both say the same numbers
        metrics = [Metric(k, round(float(v), 6) if isinstance(v, float) else float(v), now, step)
                   for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:
            self.failed(e)

    def failed(self, error: BaseException) -> None:
        self.client = None
        self.say(f"warning: MLflow failed ({one_line(error)}): training goes on; this attempt logs no more to "
                 f"MLflow (RUN/metrics.jsonl has every step)")

    def close(self) -> None:
        self.writer.close()

    def __getattr__(self, name):  # the writer's other attributes (path, enabled)
        return getattr(self.writer, name)


def flattened(config: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.001}} -> {"train.lr": "0.001"}: MLflow parameters are flat strings."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flattened(value, name + "."))
        else:
            out[name] = (value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM_CHARS]
    return out


# --- export, plot -----------------------------------------------------------------------------

def log_output(run_dir: str, path: str, folder: str | None = None, say=None) -> str | None:
    """A file a command made from the run (`export`'s model into folder "model", `plot`'s PNG)
    as an artifact of the MLflow run RUN/mlflow.json records, under its own name. The MLflow
    run id, or None: the run is not tracked, or tracking failed (one warning line on stderr;
    the file is written already)."""
    say = say or to_stderr
    record = read_record(run_dir) if os.path.isdir(run_dir) else None
    if record is None:
        return None
    uri, run_id = record["tracking_uri"], record["run_id"]
    try:
        client_for(uri).log_artifact(run_id, path, folder)
    except Exception as e:  # the file is there: tracking it is a warning
        say(f"warning: MLflow at {uri} failed ({one_line(e)}): {path} is not logged")
        return None
    name = "/".join(filter(None, (folder, os.path.basename(path))))
    say(f"MLflow: {name} logged to run {run_id} at {uri}")
    return run_id


# --- evaluate ---------------------------------------------------------------------------------

def log_evaluation(model: str, result: dict, uri: str | None = None, say=None) -> str | None:
    """`evaluate`'s results into the MLflow run of the run directory `model` (or the folder of
    an exported file, RUN/model.safetensors), at `uri` (default: the one it records), as
    eval/... metrics at the checkpoint's step and evaluation/eval.json. The MLflow run id, or
    None when nothing was logged (one line says why, on stderr: stdout is the results' JSON)."""
    say = say or to_stderr
    folder = model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model))
    record = read_record(folder)
    if record is None:
        if uri:
            say(f"MLflow: {folder} records no MLflow run (train it with --mlflow): the results are not logged")
        return None
    uri = tracking_uri(uri) if uri else record["tracking_uri"]
    run_id = record["run_id"]
    try:
        from mlflow.entities import Metric, RunTag

        client = client_for(uri)
        now, step = int(time.time() * 1000), checkpoint_step(str(result.get("checkpoint", "")))
        metrics = [Metric("eval/" + k.replace("@", "_at_"), float(v), now, step) for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        client.log_batch(run_id, metrics=metrics, tags=[RunTag("eval.checkpoint", str(result.get("checkpoint")))])
        client.log_dict(run_id, result, "evaluation/eval.json")
    except Exception as e:  # the results are printed already: tracking them is a warning
        say(f"warning: MLflow at {uri} failed ({one_line(e)}): the results are not logged")
        return None
    say(f"MLflow: evaluation logged to run {run_id} at {uri}")
    return run_id


def checkpoint_step(name: str) -> int:
    """checkpoint_000000040 (or checkpoint_000000040_r1) -> 40; 0 for an exported file."""
    m = re.match(r"checkpoint_(\d+)", name)
    return int(m.group(1)) if m else 0
