"""`show RUN`'s screen: the overview dict of run_overview.py as labelled lines, one idea each."""
from __future__ import annotations

from typing import Callable

WIDTH = 13  # the label column
PER_LINE = 3  # evaluation metrics per line


def overview_lines(o: dict, *, utc: Callable, ago: Callable) -> list[str]:
    lines: list[tuple[str, str]] = [("run", o["run"]), ("state", _state(o))]
    lines += _config(o.get("config"))
    lines += _progress(o["progress"], o["metrics"], utc, ago)
    lines += _checkpoint(o["checkpoint"])
    lines += [("attempts", _attempts(o["attempts"])), ("audit", _audit(o["audit"]))]
    lines += _evaluation(o["evaluation"])
    tb = o.get("tensorboard")
    lines.append(("tensorboard", f"{tb['folder']} ({_n(tb['event_files'], 'event file')}): {tb['command']}"
                  if tb else "none"))
    tracked = o.get("mlflow") or {}
    if tracked:
        lines.append(("mlflow", f"run {tracked.get('run_id')} at {tracked.get('tracking_uri')}"))
    lines += [("also", f"{path}: {what}") for path, what in o["other_files"].items()]
    lines += [("problem", p) for p in o["problems"]]
    return [f"{label:<{WIDTH}}{text}" for label, text in lines]


def _n(count: int, what: str) -> str:
    return f"{count:,} {what}{'' if count == 1 else 's'}"


def _state(o: dict) -> str:
    lock = o["state"]["lock"]
    if o["progress"]["finished"]:
        head = "finished"
    elif lock and lock["alive"]:
        head = "running"
    elif o["checkpoint"].get("latest_complete") is None and not o["metrics"]["lines"]:
        head = "nothing trained yet"
    else:
        head = "stopped before the end"
    return f"{head}; {o['state']['note']}"


def _config(c: dict | None) -> list[tuple[str, str]]:
    if c is None:
        return [("config", "RUN/run_config.json missing or unreadable")]
    size = c["size"]
    depths = ", ".join(f"{k.removesuffix('_depth')} {v}" for k, v in size.items() if k.endswith("_depth") and v is not None)
    model = (f"{c['model'] or '?'}, preset {c['preset'] or '(none)'} (width {size.get('width')}, embed "
             f"{size.get('embed_dim')}, {size.get('heads')} heads; depth {depths})")
    device = f"{c['gpus_per_worker'] or 0:g} GPU each" if c["use_gpu"] else "CPU"
    offload = [k for k, v in (c.get("offload") or {}).items() if v]
    training = (f"{c['workers']} workers on {device}, ZeRO stage {c['zero_stage']}, {c['precision']}"
                + (f", {' and '.join(offload)} offloaded to CPU" if offload else "")
                + f", batch {c['batch_size']} per worker x {c['grad_accum']} accumulation = "
                  f"{c['samples_per_step']} samples per step, lr {c['lr']}")
    schedule = (f"{c['epochs']} epochs" + (f" or {c['max_steps']} steps, whichever first" if c["max_steps"] else "")
                + f", a checkpoint every {c['checkpoint_every']} steps (last {c['keep_checkpoints']} kept), "
                  f"seed {c['seed']}")
    data = ", ".join(c["data_paths"] or []) + f" ({c['tokenizer']} tokenizer)"
    return [("model", model), ("data", data), ("training", training), ("schedule", schedule)]


def _progress(p: dict, m: dict, utc: Callable, ago: Callable) -> list[tuple[str, str]]:
    done, planned = p["steps_done"], p["steps_planned"]
    steps = f"{done if done is not None else 0} of {planned if planned is not None else '?'} planned"
    if isinstance(done, int) and isinstance(planned, int) and planned:
        steps += f" ({100 * done / planned:.0f}%)"
    epochs = f"in epoch {p['epoch_at_last_log']} at the last log" if p["epoch_at_last_log"] else "none logged"
    if p["epochs_done_at_checkpoint"] is not None:
        epochs += f"; {p['epochs_done_at_checkpoint']} complete at the checkpoint"
    lines = [("steps", steps), ("epochs", f"{p['epochs_planned']} planned, {epochs}")]
    last, first = m["last"], m["first"]
    if last is None:
        lines.append(("last log", "no log step in metrics.jsonl yet"))
    else:
        said = [f"step {last['step']}: loss {_num(last.get('loss'))}"]
        if first is not None and first is not last and first.get("step") != last.get("step"):
            said[0] += f" (first {_num(first.get('loss'))} at step {first['step']})"
        if last.get("samples_per_s") is not None:
            said.append(f"{_num(last['samples_per_s'], 1)} samples/s")
        if last.get("data_wait_frac") is not None:
            said.append(f"data wait {100 * last['data_wait_frac']:.1f}%")
        if last.get("time") is not None:
            said.append(f"at {utc(last['time'])} ({ago(last['time'])})")
        lines.append(("last log", ", ".join(said)))
    extra = [f"{m['replayed']} replayed after a restart"] if m["replayed"] else []
    extra += [f"{m['unreadable']} unreadable"] if m["unreadable"] else []
    lines.append(("metrics", f"{_n(m['lines'], 'line')} in metrics.jsonl" + (f" ({', '.join(extra)})" if extra else "")))
    return lines


def _num(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "?"


def _checkpoint(c: dict) -> list[tuple[str, str]]:
    where = "local" if c["local"] else "remote"
    where += ", --checkpoint-storage" if c.get("recorded_storage") else ", in the run directory"
    stored = f"{c['storage']} ({where}; {_n(len(c['all']), 'checkpoint')})"
    lines = []
    if c.get("error"):
        lines.append(("checkpoint", f"unknown: {c['error']}"))
    elif c["latest_complete"] is None:
        lines.append(("checkpoint", "no complete checkpoint yet"))
    else:
        s = c.get("state") or {}
        about = f"step {s.get('step')}, epoch {s.get('epoch')}, {s.get('world_size')} workers" if s else "state unread"
        lines.append(("checkpoint", f"{c['latest_complete']} ({about}), complete"))
    lines.append(("stored in", stored))
    lines += [("incomplete", f"{i['name']}: {i['why']}") for i in c["incomplete"]]
    return lines


def _attempts(a: dict) -> str:
    if a["started"] is None:
        return "unknown (no readable attempts.json: workers never started, or it was cut)"
    restarts = a["restarts"]
    return f"{a['started']} ({'no restarts' if not restarts else _n(restarts, 'restart or resume')})"


def _audit(a: dict) -> str:
    if "rows" not in a:
        return a["note"]
    verdict = "no sample served twice" if a["exactly_once"] else f"{_n(a['served_twice'], 'sample')} served twice"
    return (f"{verdict} ({_n(a['rows'], 'row')}, {_n(a['epochs'], 'epoch')}, {_n(a['attempts'], 'attempt')}, "
            f"{a['superseded_rows']} superseded); {a['note']}")


def _evaluation(found: list[dict]) -> list[tuple[str, str]]:
    if not found:
        return [("evaluation", "none found in the run directory or beside it (`evaluate --output FILE` "
                               "writes only FILE)")]
    lines = []
    for e in found:
        r = e["results"]
        lines.append(("evaluation", f"{e['checkpoint']}, {r.get('samples')} samples, in {', '.join(e['files'])}"))
        shown = [(k, v) for k, v in sorted(r.items()) if isinstance(v, float) and not k.endswith(("candidates", "samples"))]
        for i in range(0, len(shown), PER_LINE):
            lines.append(("", "   ".join(f"{k} {v:.4g}" for k, v in shown[i:i + PER_LINE])))
    return lines
