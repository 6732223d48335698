"""`python ray_job.py demo`: the whole flow on a synthetic corpus, on a local embedded Ray.

make-corpus (with one of each defect planted) -> preprocess -> train (tiny, 2 workers,
DeepSpeed ZeRO-2) -> evaluate on held-out 16-way shards -> export -> plot -> embed the corpus
into a Lance table -> search it with a text query -> caption the held-out samples, then a short
summary that ends with one search result and one generated caption. Every step is the same code the CLI runs; re-running resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import time

HELD_OUT_SEED = 12345


def run_demo(workdir: str = "demo_out", samples: int = 640, quick: bool = False, log=print) -> dict:
    from pipelines.console import keep_worker_logs
    from pipelines.corpus import make_corpus
    from pipelines.preprocess import format_summary, preprocess
    from pipelines.runtime import init_ray

    from .config import load_run_config
    from .evaluate import evaluate
    from .export import export
    from .metrics import plot_run, read_metrics
    from .trainer import local_cpus, train

    os.makedirs(workdir, exist_ok=True)
    paths = {name: os.path.join(workdir, name)
             for name in ("raw", "heldout_raw", "clean", "heldout", "run", "embeddings")}
    timings: dict[str, float] = {}

    def stage(name: str):
        log(f"\n== {name} " + "=" * (60 - len(name)))
        timings[name] = time.time()

    train_over = {"max_steps": 10, "log_every": 2} if quick else None
    cfg = load_run_config(None, data_paths=[paths["clean"]], run_dir=paths["run"], train=train_over)
    # one Ray for every stage, sized for training (preprocessing alone would start it with
    # one logical CPU per core, and the training workers would leave none to the data tasks)
    init_ray(num_cpus=local_cpus(cfg))

    stage("make-corpus")
    if not os.path.exists(os.path.join(paths["raw"], "_corpus.json")):
        make_corpus(paths["raw"], samples, 8, seed=0, defects=True, progress=True)
        make_corpus(paths["heldout_raw"], 16, 1, seed=HELD_OUT_SEED)
    log(f"{samples} samples of 16 subjects (+ one of each planted defect) in {paths['raw']}")

    stage("preprocess")
    stats = preprocess([paths["raw"]], paths["clean"], progress=True)
    log(format_summary(stats, paths["clean"]))
    preprocess([paths["heldout_raw"]], paths["heldout"], progress=False)

    stage("train")
    summary = train(cfg, log=log)
    log(f"trained {summary['steps']} steps in {summary['seconds']} s")

    stage("evaluate")
    result = evaluate(paths["run"], [paths["heldout"]], output=os.path.join(workdir, "eval.json"))

    stage("export")
    exported = export(paths["run"], os.path.join(workdir, "model.safetensors"))
    plot = plot_run(paths["run"])

    used = _use_the_model(exported["output"], paths, os.path.join(workdir, "captions.jsonl"), stage)
    timings["end"] = time.time()

    report = _report(stats, summary, read_metrics(paths["run"]), result, exported, plot, timings)
    report["use"] = used
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(report, f, indent=1)
    keep_worker_logs(os.path.join(paths["run"], "logs"))  # the evaluate, embed and caption actors' too
    log(format_report(report))
    return report


def _use_the_model(model: str, paths: dict, captions: str, stage) -> dict:
    """embed -> search -> caption with the exported model: one search result for the first
    subject's caption-like query, and the generated caption of the first held-out sample."""
    from pipelines.corpus_samples import subject_names

    from .inference.caption import caption
    from .inference.embed_job import EmbedConfig, embed
    from .inference.search import search_corpus

    stage("embed")
    embedded = embed(EmbedConfig(model=model, data=(paths["clean"],), output=paths["embeddings"]))
    stage("search")
    query = f"a photo of {subject_names(1)[0]}"
    top = search_corpus(paths["embeddings"], {"text": query}, k=1)[0]
    stage("caption")
    captioned = caption(model, [paths["heldout"]], captions)
    with open(captions) as f:
        first = min((json.loads(line) for line in f), key=lambda row: row["key"])
    truth = _held_out_caption(paths["heldout"], first["key"])
    return {"embedded": embedded["counts"]["embedded"], "table": paths["embeddings"],
            "search": {"query": query, "key": top["key"], "caption": top["caption"], "score": round(top["score"], 3)},
            "caption": {"key": first["key"], "generated": first["caption"], "held_out": truth,
                        "samples": captioned["samples"]}}


def _held_out_caption(folder: str, key: str) -> str | None:
    """The caption the held-out sample came with (from the preprocessed shard)."""
    import glob
    import tarfile

    for path in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name == f"{key}.txt":
                    return tar.extractfile(member).read().decode("utf-8", "replace")
    return None


def _report(stats: dict, summary: dict, metrics: list[dict], result: dict, exported: dict, plot: str,
            timings: dict[str, float]) -> dict:
    """What the demo shows and writes to summary.json; `timings` holds each stage's start, then "end"."""
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    return {
        "preprocess": {k: stats[k] for k in ("read", "written", "quarantined", "filtered", "duplicates")},
        "train": {"steps": summary["steps"], "loss_first": first, "loss_last": last,
                  "loss_drop": round(1 - last / first, 4),
                  "samples_per_s": round(sum(m["samples_per_s"] for m in metrics) / len(metrics), 1),
                  "data_wait_frac": round(sum(m["data_wait_frac"] for m in metrics) / len(metrics), 3)},
        "evaluate": result,
        "export": {"file": exported["output"], "probe_max_abs_diff": exported["probe_max_abs_diff"]},
        "seconds": {name: round(timings[nxt] - timings[name], 1)
                    for name, nxt in zip(list(timings)[:-1], list(timings)[1:])},
        "plot": plot,
    }


def _use_lines(u: dict | None) -> list[str]:
    if not u:
        return []
    s, c = u["search"], u["caption"]
    return [f"  embed       {u['embedded']} samples -> {u['table']}",
            f"  search      \"{s['query']}\" -> {s['key']} (score {s['score']}): {_quoted(s['caption'])}",
            f"  caption     held-out {c['key']}: \"{c['generated']}\" (its own caption: \"{c['held_out']}\")"]


def _quoted(caption: str | None) -> str:
    return "(no caption: an image-only sample)" if caption is None else f'"{caption}"'


def format_report(r: dict) -> str:
    t, e = r["train"], r["evaluate"]
    recalls = [f"    {k:<28} {v}" for k, v in sorted(e.items()) if "/recall@" in k]
    lines = [
        "\n== summary " + "=" * 50,
        f"  preprocess  read {r['preprocess']['read']}, written {r['preprocess']['written']}, quarantined "
        f"{sum(r['preprocess']['quarantined'].values())}, filtered {sum(r['preprocess']['filtered'].values())}, "
        f"duplicates {r['preprocess']['duplicates']}",
        f"  train       {t['steps']} steps, loss {t['loss_first']:.3f} -> {t['loss_last']:.3f} "
        f"({100 * t['loss_drop']:.0f}% lower), {t['samples_per_s']} samples/s, data wait "
        f"{100 * t['data_wait_frac']:.1f}% of step time",
        f"  evaluate    held-out 16-way retrieval ({e['samples']} samples), caption loss "
        f"{e.get('caption_loss', 'n/a')}",
        *recalls,
        f"  export      {r['export']['file']} (matches the engine: max |diff| {r['export']['probe_max_abs_diff']})",
        f"  plot        {r['plot']}",
        "  seconds     " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()),
        *_use_lines(r.get("use")),  # last: what using the model looks like
    ]
    return "\n".join(lines)
