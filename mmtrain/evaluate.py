"""Evaluation of a trained model on held-out shards, at scale: cross-modal retrieval recall@k for
every direction present, zero-shot accuracy on the subjects the captions name, caption loss and
BLEU-4 of generated captions.

The embeddings come through `embed`'s own path (`inference.batch_embed.embedded_rows`: the
training ingest's reading and decoding on Ray Data, then a pool of model actors), so evaluation
sees exactly the transforms training saw and scales as `embed` does; the caption metrics come
from a second actor pass (`eval_captions`). The driver only gathers the vectors and embeds the
label prompts. The metrics themselves are in `eval_metrics`.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from pipelines.dataset import check_preprocessed
from pipelines.errors import UserError
from pipelines.shards import expand_shards

from .eval_metrics import MODALITIES, corpus_bleu, named_label, retrieval_recalls, zero_shot_accuracy

CORPUS_FILE = "_corpus.json"  # a synthetic corpus's description: its "subject_names"
MAX_LABELS, MAX_LABEL_CHARS = 10_000, 200


def evaluate(run_dir: str, data: list[str], *, output: str | None = None, batch_size: int = 64,
             workers: int = 2, gpus_per_worker: float = 0, labels: list[str] | None = None,
             template: str = "a photo of {}", caption_max_len: int | None = None,
             storage_options: dict | None = None, progress: bool = True) -> dict:
    """A flat dict: `image_to_text/recall@1`, ... for every direction with both modalities
    present in at least 2 samples; `zero_shot/image_accuracy` (and audio) over the samples
    whose caption names one of `labels` (default: the corpus's subject names, when the data
    carries them); `caption_loss`, `caption/bleu4`; the sample counts and the checkpoint.
    `run_dir` is a run directory (its newest complete checkpoint) or an exported
    `.safetensors`; `storage_options` reach the data and the model. `progress`: a bar per
    pass on stderr (Ray Data's own bars are off: `pipelines.runtime`)."""
    from pipelines.dataset import shard_counts
    from pipelines.runtime import init_ray

    from .eval_captions import caption_pass
    from .inference.batch_embed import embedded_rows
    from .inference.loaded import load_model

    _check_settings(workers, batch_size, template, caption_max_len)
    loaded = load_model(run_dir, storage_options=storage_options)  # the driver's copy: data settings, prompts
    shards = expand_shards(list(data), storage_options)
    preprocessed = check_preprocessed(shards, loaded.data_cfg, storage_options)
    labels = labels if labels is not None else corpus_labels(data, storage_options)
    # an embedded Ray gets a CPU beyond the actors' for the read and decode tasks that feed them
    init_ray(num_cpus=max(os.cpu_count() or 1, workers + 2), dashboard=False)
    run = dict(preprocessed=preprocessed, workers=workers, batch_size=batch_size, gpus_per_worker=gpus_per_worker,
               storage_options=storage_options)
    counts = shard_counts(shards, storage_options) if preprocessed else None
    total = sum(counts.values()) if counts else None
    with _bar(progress, total, "evaluate: embed") as bar:
        rows = gather_vectors(embedded_rows(run_dir, shards, loaded.data_cfg, **run), loaded.embed_dim, bar)
    if rows["n"] == 0:
        raise UserError(f"no samples to evaluate in {', '.join(data)}")
    result: dict = {"samples": rows["n"], "checkpoint": checkpoint_name(loaded.origin),
                    **retrieval_recalls(rows["emb"], rows["present"])}
    if labels:
        result.update(_zero_shot(loaded, rows, labels, template))
    with _bar(progress, rows["n"], "evaluate: captions") as bar:
        captions = caption_pass(run_dir, shards, loaded.data_cfg, max_len=caption_max_len, bar=bar, **run)
    if captions["loss"] is not None:
        result["caption_loss"] = round(captions["loss"], 4)
        result["caption/bleu4"] = round(corpus_bleu(captions["generated"], captions["references"]), 4)
        result["caption/samples"] = len(captions["generated"])
        if labels:
            result.update(_captions_naming(captions, labels))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
    return result


def parse_labels(text: str | None) -> list[str] | None:
    """`--labels L1,L2,...` -> the labels (None when not given); one that names none is a UserError."""
    if text is None:
        return None
    labels = [s.strip() for s in text.split(",") if s.strip()]
    if not labels or len(labels) > MAX_LABELS or any(len(s) > MAX_LABEL_CHARS for s in labels):
        raise UserError(f"--labels must name 1 to {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters, "
                        f"e.g. --labels 'a red circle,a blue square'")
    return labels


def _check_settings(workers: int, batch_size: int, template: str, caption_max_len: int | None) -> None:
    if workers < 1 or batch_size < 1:
        raise UserError(f"--workers and --batch-size must be at least 1, got {workers} and {batch_size}")
    if caption_max_len is not None and caption_max_len < 2:
        raise UserError(f"--caption-max-len must leave room for BOS and EOS (>= 2), got {caption_max_len}")
    try:
        ok = "{}" in template and template.format("x") != template
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"--template must hold one {{}} for the label, e.g. 'a photo of {{}}'; got {template!r}")


def _bar(enabled: bool, total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc=desc, dynamic_ncols=True, disable=not enabled)


def gather_vectors(ds, dim: int, bar=None) -> dict:
    """The rows of an `embedded_rows` dataset on the driver: {"n", "caption": [str | None],
    "emb": {m: float32 [n, dim], zeros where absent}, "present": {m: bool [n]}}."""
    from .inference.schema import VECTOR_COLUMNS

    captions: list = []
    emb: dict[str, list] = {m: [] for m in MODALITIES}
    present: dict[str, list] = {m: [] for m in MODALITIES}
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        captions += table.column("caption").to_pylist()
        if bar is not None:
            bar.update(table.num_rows)
        for m in MODALITIES:
            col = table.column(VECTOR_COLUMNS[m]).combine_chunks()
            valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool)
            out = np.zeros((len(col), dim), np.float32)
            # flatten() leaves out the null rows' slots and honours the slice offset
            out[valid] = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)
            emb[m].append(out)
            present[m].append(valid)
    n = len(captions)
    return {"n": n, "caption": captions,
            "emb": {m: np.concatenate(v) if v else np.zeros((0, dim), np.float32) for m, v in emb.items()},
            "present": {m: np.concatenate(v) if v else np.zeros(0, bool) for m, v in present.items()}}


def _zero_shot(loaded, rows: dict, labels: list[str], template: str) -> dict:
    """Zero-shot accuracy of the image and the audio embeddings against the label prompts,
    over the samples that have the modality and whose caption names exactly one label."""
    from .inference.classify import label_embeddings, zero_shot

    from .inference.inputs import BadInput

    truth = [named_label(c, labels) if c is not None else None for c in rows["caption"]]
    try:
        label_emb = label_embeddings(loaded, labels, template)
    except BadInput as e:
        raise UserError(f"--labels: {e}") from None
    result: dict = {"zero_shot/labels": len(labels)}
    for m in ("image", "audio"):
        have = rows["present"][m]
        if not have.any():
            continue
        best, _ = zero_shot(rows["emb"][m][have], label_emb)
        acc, n = zero_shot_accuracy(best, [t for t, h in zip(truth, have) if h])
        if acc is not None:
            result[f"zero_shot/{m}_accuracy"], result[f"zero_shot/{m}_samples"] = round(acc, 4), n
    return result


def _captions_naming(captions: dict, labels: list[str]) -> dict:
    """The share of generated captions that name the subject their reference names."""
    pairs = [(named_label(g, labels), named_label(r, labels))
             for g, r in zip(captions["generated"], captions["references"])]
    named = [g == r for g, r in pairs if r is not None]
    return {"caption/names_subject": round(float(np.mean(named)), 4)} if named else {}


def checkpoint_name(origin: str) -> str:
    """The checkpoint a LoadedModel came from ("RUN (checkpoint NAME)"), or the exported file's name."""
    m = re.search(r" \(checkpoint ([^()]+)\)$", origin)
    return m.group(1) if m else os.path.basename(origin)


def corpus_labels(data: list[str], storage_options: dict | None = None) -> list[str] | None:
    """The subject names a synthetic corpus lists in its `_corpus.json`: in a DATA folder, or
    (preprocessed data) in the input folders its `_job.json` names. None when no folder has
    one. A file that is there but malformed is a one-line UserError."""
    from pipelines.dataset import JOB_FILE
    from pipelines.storage import filesystem, join

    found: list[str] = []
    for folder in data:
        for where in [folder, *_job_inputs(folder, JOB_FILE, storage_options)]:
            fs, path = filesystem(where, storage_options)
            if not fs.isfile(join(path, CORPUS_FILE)):
                continue
            names = _read_json(fs, join(path, CORPUS_FILE)).get("subject_names")
            if (not isinstance(names, list) or len(names) > MAX_LABELS
                    or not all(isinstance(s, str) and 0 < len(s.strip()) <= MAX_LABEL_CHARS for s in names)):
                raise UserError(f"{join(where, CORPUS_FILE)}: subject_names must be a list of at most "
                                f"{MAX_LABELS} non-empty strings of at most {MAX_LABEL_CHARS} characters")
            found += [s for s in names if s not in found]
            break
    return found or None


def _job_inputs(folder: str, job_file: str, storage_options: dict | None) -> list[str]:
    """The inputs a preprocessed folder was made from, on the folder's own storage only: the
    file comes with the data, and must not send us to another host or protocol."""
    from pipelines.storage import filesystem, join, protocol_of

    fs, path = filesystem(folder, storage_options)
    if not fs.isfile(join(path, job_file)):
        return []
    inputs = _read_json(fs, join(path, job_file)).get("inputs")
    return [i for i in inputs if isinstance(i, str) and i and protocol_of(i) == protocol_of(fs)
            ] if isinstance(inputs, list) else []


def _read_json(fs, path: str) -> dict:
    with fs.open(path, "rb") as f:
        raw = f.read(1 << 20)  # a description, never a corpus: a bigger file is not ours
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSON file ({type(e).__name__})")
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value
