"""`show RUN`: one screen about a training run, gathered from the files the run writes, as a
dict (`run_overview`, what `--json` prints) and as text (`format_overview`).

    RUN/run_config.json        the config summary; where the checkpoints are stored
    RUN/deepspeed_config.json  the steps planned (the learning-rate schedule's length)
    RUN/metrics.jsonl          rank 0's log steps: the last loss, samples/s, data wait, time
    RUN/attempts.json          how many times workers started on the run (attempts.py)
    RUN/train.lock             whether a `train` holds the run now (run_lock.py)
    RUN/audit/                 the sample audit, checked as the `audit` command checks it
    RUN/tensorboard/           TensorBoard's event files
    RUN/mlflow.json            the MLflow run tracking it (`train --mlflow`)
    the checkpoint store       the newest complete checkpoint (checkpoint/: CheckpointStore)
    evaluation results         `evaluate --output FILE` writes FILE only, nothing into RUN; so
                               evaluate results are looked for in RUN and in the folder that
                               holds it (the demo's eval.json and summary.json), and one found
                               beside RUN counts only if it names a checkpoint of this run

A run in progress or killed may have any file partial: what cannot be read is said in
`problems`, and everything else is still shown.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

from pipelines.errors import UserError
from pipelines.storage import filesystem, files_below, is_local, join

RUN_FILES = ("run_config.json", "metrics.jsonl", "attempts.json", "deepspeed_config.json", "train")
MAX_RESULT_BYTES = 1 << 20  # a JSON file larger than this beside the run is not an evaluate result


class RunFiles:
    """The run directory's files, local or at a URL; a read that fails is None and a problem."""

    def __init__(self, run: str, storage_options: dict | None):
        self.fs, self.path = filesystem(run, storage_options)
        self.local = is_local(self.fs)
        self.url = os.path.abspath(self.path) if self.local else run.rstrip("/")
        self.path = self.path.rstrip("/") or "/"
        self.problems: list[str] = []
        if not self.fs.isdir(self.path):
            raise UserError(f"{run} does not exist or is not a folder: give a run directory (`train --run-dir`)")
        self.names = {os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False)}
        if not self.names & set(RUN_FILES):
            raise UserError(f"{run} is not a training run directory (it has none of {', '.join(RUN_FILES)})")

    def read(self, name: str) -> bytes | None:
        if name not in self.names and "/" not in name:
            return None
        try:
            return self.fs.cat_file(join(self.path, name))
        except FileNotFoundError:
            return None

    def json(self, name: str) -> dict | None:
        """A JSON object file of the run; None (and a problem said) when missing or damaged."""
        data = self.read(name)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            self.problems.append(f"{name} is unreadable ({type(e).__name__}: {e}; a write cut short?)")
            return None
        if not isinstance(value, dict):
            self.problems.append(f"{name} holds no JSON object")
            return None
        return value


def run_overview(run: str, storage_options: dict | None = None) -> dict:
    """Everything `show` says about `run`, as one JSON-able dict (see the module doc)."""
    files = RunFiles(run, storage_options)
    config = files.json("run_config.json")
    store_info = checkpoints(files, config, storage_options)
    metrics = read_metrics(files)
    overview = {
        "run": files.url,
        "state": run_state(files),
        "config": config_summary(config) if config else None,
        "checkpoint": store_info,
        "metrics": metrics,
        "attempts": attempts(files),
        "audit": audit_status(files),
        "evaluation": evaluations(files, store_info),
        "tensorboard": tensorboard(files),
        "mlflow": files.json("mlflow.json") if "mlflow.json" in files.names else None,
        "other_files": other_files(files),
    }
    overview["progress"] = progress(files, config, store_info, metrics)
    overview["problems"] = files.problems
    return overview


# --- config and progress ------------------------------------------------------------------

def config_summary(config: dict) -> dict:
    """What the run was asked to do, from RUN/run_config.json (read as JSON, not as a RunConfig:
    a run written by another version of this code is still shown)."""
    model, train, scale = config.get("model") or {}, config.get("train") or {}, config.get("scale") or {}
    per_step = None
    if all(isinstance(v, int) for v in (train.get("batch_size"), train.get("grad_accum"), scale.get("workers"))):
        per_step = train["batch_size"] * train["grad_accum"] * scale["workers"]
    return {
        "preset": config.get("preset"), "model": model.get("name"),
        "size": {k: model.get(k) for k in ("width", "embed_dim", "heads", "image_depth", "text_depth",
                                           "audio_depth", "fusion_depth", "decoder_depth")},
        "data_paths": config.get("data_paths"), "tokenizer": config.get("tokenizer"),
        # an elastic run's range (mmtrain/elastic.py): "1-2"
        "workers": (f"{scale['min_workers']}-{scale.get('workers')}"
                    if scale.get("min_workers") not in (None, scale.get("workers")) else scale.get("workers")),
        "use_gpu": scale.get("use_gpu"), "gpus_per_worker": scale.get("gpus_per_worker"),
        "zero_stage": train.get("zero_stage"), "precision": train.get("precision"),
        "offload": {"optimizer": train.get("offload_optimizer"), "params": train.get("offload_params")},
        "batch_size": train.get("batch_size"), "grad_accum": train.get("grad_accum"), "samples_per_step": per_step,
        "epochs": train.get("epochs"), "max_steps": train.get("max_steps"), "lr": train.get("lr"),
        "checkpoint_every": train.get("checkpoint_every"), "keep_checkpoints": train.get("keep_checkpoints"),
        "audit_samples": train.get("audit_samples"), "seed": config.get("seed"),
        "checkpoint_storage": config.get("checkpoint_storage") or None,
    }


def progress(files: RunFiles, config: dict | None, store_info: dict, metrics: dict) -> dict:
    """Steps and epochs done and planned. Done: the last log step (the newest line: after a
    restart, steps replayed from the checkpoint count once), or the checkpoint's if newer.
    Planned: RUN/deepspeed_config.json's schedule length, which is --max-steps or every epoch's steps."""
    train = (config or {}).get("train") or {}
    ds = files.json("deepspeed_config.json") or {}
    planned = ((ds.get("scheduler") or {}).get("params") or {}).get("total_num_steps", train.get("max_steps"))
    last = metrics.get("last") or {}
    saved = store_info.get("state") or {}
    done = max([s for s in (last.get("step"), saved.get("step")) if isinstance(s, int)], default=None)
    return {
        "steps_done": done, "steps_planned": planned,
        "epochs_planned": train.get("epochs"),
        "epochs_done_at_checkpoint": saved.get("epoch"),
        # the metrics' epoch is the epoch being trained, counted from 0
        "epoch_at_last_log": last["epoch"] + 1 if isinstance(last.get("epoch"), int) else None,
        "finished": bool(isinstance(planned, int) and isinstance(saved.get("step"), int) and saved["step"] >= planned
                         or isinstance(train.get("epochs"), int) and isinstance(saved.get("epoch"), int)
                         and saved["epoch"] >= train["epochs"]),
    }


# --- checkpoints --------------------------------------------------------------------------

def checkpoints(files: RunFiles, config: dict | None, storage_options: dict | None) -> dict:
    """Where the checkpoints are and which is the newest complete one, found as a resume finds
    it (`CheckpointStore.latest_complete`: every rank's done record, every listed size), with
    the newer incomplete ones and why. A store that cannot be read is said, not raised."""
    from .checkpoint import CheckpointStore, CheckpointUnreadable, UnsafeKey
    from .checkpoint.location import STORAGE_NAME, checkpoint_root, normalized

    config = config or {}
    storage = config.get("checkpoint_storage") or ""
    # location.run_store's rule (options given now win over the saved ones), here also for a RUN
    # at a URL and a run_config.json that is damaged (then the run directory's own train/)
    root = (checkpoint_root(files.path, storage) if files.local
            else join(normalized(storage) or files.url, STORAGE_NAME))
    info: dict = {"storage": root, "local": is_local(root), "recorded_storage": storage or None,
                  "latest_complete": None, "incomplete": [], "all": []}
    try:
        store = CheckpointStore(root, storage_options or config.get("storage_options") or {})
        info["all"] = [os.path.basename(p) for p in store.list()]
        skipped: list[str] = []
        latest = store.latest_complete(log=skipped.append)
        info["incomplete"] = [_incomplete(line) for line in skipped]
        if latest is not None:
            info["latest_complete"] = os.path.basename(latest)
            info["path"] = latest
            info["state"] = _saved_state(store, latest)
    except (CheckpointUnreadable, UnsafeKey, UserError) as e:
        info["error"] = str(e)
        files.problems.append(f"checkpoint storage {root}: {e}")
    return info


def _incomplete(line: str) -> dict:
    """The checkpoint and the reason in a `layout.say_incomplete` line."""
    name, _, rest = line.removeprefix("checkpoint ").partition(" is incomplete (")
    why, _, _ = rest.rpartition("): a save was interrupted")
    return {"name": name, "why": why or rest}


def _saved_state(store, checkpoint: str) -> dict | None:
    try:
        from dataclasses import asdict

        return asdict(store.saved_state(checkpoint))
    except (ValueError, TypeError, FileNotFoundError):
        return None  # complete means its train_state.json parsed: only a change since could get here


# --- metrics, attempts, lock --------------------------------------------------------------

def read_metrics(files: RunFiles) -> dict:
    """RUN/metrics.jsonl (rank 0's log steps) line by line: the first and the newest readable
    record, how many lines could not be read (a line cut by a kill, a damaged byte) and how
    many replay a step already logged (steps run again after a restart)."""
    data = files.read("metrics.jsonl")
    if data is None:
        return {"lines": 0, "unreadable": 0, "replayed": 0, "first": None, "last": None}
    lines = unreadable = replayed = 0
    first = last = None
    newest_step = None
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        lines += 1
        try:
            record = json.loads(raw)
            assert isinstance(record, dict) and isinstance(record.get("step"), int)
        except (ValueError, UnicodeDecodeError, AssertionError):
            unreadable += 1
            continue
        if newest_step is not None and record["step"] <= newest_step:
            replayed += 1
        newest_step = max(record["step"], newest_step or 0)
        first = first or record
        last = record
    if unreadable:
        files.problems.append(f"metrics.jsonl: {unreadable} of {lines} lines unreadable (skipped)")
    keep = ("step", "epoch", "loss", "samples_per_s", "data_wait_frac", "lr", "time", "tflops_per_s", "mfu")
    return {"lines": lines, "unreadable": unreadable, "replayed": replayed,
            "first": {k: first.get(k) for k in keep} if first else None,
            "last": {k: last.get(k) for k in keep} if last else None}


def attempts(files: RunFiles) -> dict:
    """RUN/attempts.json: worker groups started on the run (a driver re-run and each of Ray
    Train's automatic restarts count alike); every start after the first is a restart."""
    record = files.json("attempts.json")
    started = (record or {}).get("started")
    if not isinstance(started, int):
        return {"started": None, "restarts": None}
    return {"started": started, "restarts": max(started - 1, 0)}


def run_state(files: RunFiles) -> dict:
    """Whether a `train` holds the run now (RUN/train.lock, judged as the next train judges it)."""
    if not files.local:
        return {"lock": None, "note": "not checked (the run directory is not local)"}
    from .run_lock import holder

    lock = holder(files.path)
    if lock is None:
        note = "no train holds the run"
    elif lock["alive"]:
        note = f"a train holds the run (pid {lock.get('pid')} on {lock.get('host')}, since {_utc(lock.get('since'))})"
    else:
        note = f"its last train ended without releasing the run ({lock['why_dead']}): killed or lost"
    return {"lock": lock, "note": note}


# --- audit, evaluation, tensorboard ----------------------------------------------------------

def audit_status(files: RunFiles) -> dict:
    """The `audit` command's check of RUN/audit/ (without --data: ids served twice, not ids
    never served, which needs the data's manifests)."""
    if "audit" not in files.names:
        return {"recorded": False, "note": "not recorded (train with --audit-samples)"}
    if not files.local:
        return {"recorded": True, "note": "not checked (the run directory is not local)"}
    from .audit import check

    try:
        report = check(files.path)
    except (KeyError, TypeError, ValueError) as e:
        files.problems.append(f"audit/: a line is not an audit record ({type(e).__name__}: {e})")
        return {"recorded": True, "note": "unreadable"}
    twice = sum(e["served_twice"] for e in report["epochs"].values())
    return {"recorded": True, "rows": report["rows"], "attempts": report["attempts"],
            "superseded_rows": report["superseded_rows"], "epochs": len(report["epochs"]),
            "served_twice": twice, "exactly_once": report["exactly_once"],
            "note": f"run `audit --run-dir {files.url} --data ...` for samples never served too"}


def evaluations(files: RunFiles, store_info: dict) -> list[dict]:
    """`evaluate` results found in RUN, or beside it naming one of this run's checkpoints."""
    ours = set(store_info.get("all") or [])
    found: dict[str, dict] = {}
    parent = files.path.rstrip("/").rsplit("/", 1)[0] or "/"
    for folder, beside in ((files.path, False), (parent, True)):
        try:  # this folder's own files only: the one holding RUN may be large
            entries = files.fs.ls(folder, detail=True)
        except OSError:
            continue
        sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") or 0 for e in entries
                 if e.get("type") == "file" and e["name"].endswith(".json")}
        for name in sorted(sizes):
            if sizes[name] > MAX_RESULT_BYTES:
                continue
            result = _evaluate_result(files.fs, join(folder, name))
            if result is None or (beside and result.get("checkpoint") not in ours):
                continue
            where = (files.fs.unstrip_protocol(join(folder, name)) if not files.local else join(folder, name))
            key = json.dumps(result, sort_keys=True)
            found.setdefault(key, {"files": [], "checkpoint": result.get("checkpoint"), "results": result})
            found[key]["files"].append(where)
    return list(found.values())


def _evaluate_result(fs, path: str) -> dict | None:
    """The evaluate result in a JSON file (or its "evaluate" section, as in the demo's
    summary.json): an object with the sample count, the checkpoint and a metric."""
    try:
        value = json.loads(fs.cat_file(path))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if isinstance(value, dict) and isinstance(value.get("evaluate"), dict):
        value = value["evaluate"]
    if not isinstance(value, dict) or not isinstance(value.get("samples"), int) or "checkpoint" not in value:
        return None
    return value if any("/" in k for k in value) else None


def tensorboard(files: RunFiles) -> dict | None:
    if "tensorboard" not in files.names:
        return None
    folder = join(files.path, "tensorboard")
    events = [n for n in files_below(files.fs, folder) if "tfevents" in os.path.basename(n)]
    url = folder if files.local else files.fs.unstrip_protocol(folder)
    return {"folder": url, "event_files": len(events), "command": f"tensorboard --logdir {url}"}


def other_files(files: RunFiles) -> dict[str, str]:
    """What else the run made that a person may want to open, by its path."""
    about = {"training.png": "the loss and throughput plot (`plot`)", "logs": "the run's logs",
             "profile": "torch.profiler traces (`--profile-steps`), for TensorBoard"}
    return {join(files.url, name): what for name, what in about.items() if name in files.names}


def _utc(t) -> str:
    if not isinstance(t, (int, float)):
        return "?"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(t) -> str:
    if not isinstance(t, (int, float)):
        return ""
    s = max(time.time() - t, 0)
    return (f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else
            f"{s / 3600:.1f} h ago" if s < 172800 else f"{s / 86400:.0f} days ago")


def format_overview(overview: dict) -> str:
    from .run_overview_text import overview_lines

    return "\n".join(overview_lines(overview, utc=_utc, ago=_ago))
