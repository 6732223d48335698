"""Zero-shot classification: each label becomes a prompt ("a photo of {}"), the prompt goes
through the text tower, and a sample's image (else its audio) takes the label whose prompt
embedding it is most similar to, CLIP's way: softmax over labels of the model's scaled cosine
similarity. `classify` is the batch job: the samples embed on Ray Data through
`batch_embed.embedded_rows` (the actor pool `embed` uses), the driver scores them against the
label embeddings (one small matrix product per batch) and writes one JSON line per sample.

The synthetic corpus's subjects are named with their article ("a red circle") and its most
common caption is "a photo of {subject}", so the default template with the subject names as
labels reproduces captions the text tower was trained on.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from collections import Counter

import numpy as np
import pyarrow as pa

from pipelines.errors import UserError

from .schema import VECTOR_COLUMNS

DEFAULT_TEMPLATE = "a photo of {}"
# the model's temperature at initialization (CLIP's 1/0.07), for a caller without the model at
# hand; `logit_scale(loaded)` is the trained one (the demo's ends near it, at 14.2)
DEFAULT_SCALE = 1 / 0.07
CLASSIFIED = ("image", "audio")  # the modality classified: the first a sample has
NO_MODALITY = "no image or audio to classify"


def prompts(labels: list[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The template with each label in place of `{}` (every `{}`; other braces are literal, so
    a template is never a format string that could fail on `{0}` or `{name}`)."""
    return [template.replace("{}", label) for label in labels]


def label_embeddings(loaded, labels: list[str], template: str = DEFAULT_TEMPLATE) -> np.ndarray:
    """The labels' prompts through the text tower: L2-normalized float32 [L, D], row i for
    labels[i]. A prompt the text transform refuses (too long, nothing left after
    normalization) is a `BadInput` naming the label."""
    from .inputs import BadInput, embed_items

    texts = prompts(labels, template)
    try:
        emb = embed_items([{"text": t} for t in texts], loaded)["text"]
    except BadInput as e:  # "input 3: ..." -> the label it was
        i = str(e).split(":", 1)[0].removeprefix("input ")
        label = labels[int(i)] if i.isdigit() and int(i) < len(labels) else "?"
        raise BadInput(f"label {label!r}: {str(e).split(':', 1)[-1].strip()}") from None
    empty = [labels[i] for i in np.flatnonzero(np.linalg.norm(emb, axis=1) == 0)]
    if empty:  # a prompt of only padding: the text tower has nothing to embed
        raise BadInput(f"label {empty[0]!r}: its prompt {prompts(empty, template)[0]!r} has no text to embed")
    return np.ascontiguousarray(emb, np.float32)


def logit_scale(loaded) -> float:
    """The model's trained temperature exp(logit_scale), clamped as training clamps it."""
    raw = float(loaded.model.logit_scale.detach().float().reshape(-1)[0])
    return math.exp(min(raw, math.log(100.0)))


def zero_shot(emb: np.ndarray, label_emb: np.ndarray, scale: float = DEFAULT_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """(best [N] int64, scores [N, L] float32): scores are the softmax over labels of `scale` x
    the cosine similarity of each row of `emb` [N, D] with each row of `label_emb` [L, D] (rows
    are normalized here, so any non-zero vectors will do); best is the argmax (the first label
    on a tie). A zero row has no direction: its scores are uniform."""
    emb, label_emb = np.asarray(emb, np.float32), np.asarray(label_emb, np.float32)
    if emb.ndim != 2 or label_emb.ndim != 2 or emb.shape[1] != label_emb.shape[1] or len(label_emb) == 0:
        raise ValueError(f"zero_shot: need emb [N, D] and label_emb [L>0, D], got {emb.shape} and {label_emb.shape}")
    logits = scale * (_unit_rows(emb) @ _unit_rows(label_emb).T)
    logits -= logits.max(axis=1, keepdims=True)  # exp of at most 0: no overflow
    scores = np.exp(logits)
    scores /= scores.sum(axis=1, keepdims=True)
    return scores.argmax(axis=1).astype(np.int64), scores.astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)


# --- the job ---------------------------------------------------------------------------

def check_request(labels: list[str], template: str, output: str) -> None:
    """The job's arguments, before anything is loaded: one-line UserErrors."""
    if any(not label.strip() for label in labels):
        raise UserError("--labels: a label is empty (give them as L1,L2,... without empty items)")
    twice = sorted(label for label, n in Counter(labels).items() if n > 1)
    if twice:
        raise UserError(f"--labels: {twice[0]!r} is given twice")
    if len(labels) < 2:
        raise UserError(f"--labels: need at least 2 labels to choose between, got {len(labels)}")
    if "{}" not in template:
        raise UserError(f"--template {template!r} has no {{}} where the label goes (e.g. \"a photo of {{}}\")")
    folder = os.path.dirname(os.path.abspath(output))
    if "://" in output:
        raise UserError(f"--output {output}: a local file (the JSON lines are written on this machine)")
    if os.path.isdir(output):
        raise UserError(f"--output {output} is a folder; name the .jsonl file to write")
    if not os.path.isdir(folder):
        raise UserError(f"--output {output}: the folder {folder} does not exist")


def classify(model: str, data: list[str], labels: list[str], template: str = DEFAULT_TEMPLATE, *,
             output: str, workers: int = 2, batch_size: int = 64, gpus_per_worker: float = 0,
             storage_options: dict | None = None, progress: bool = True) -> dict:
    """Classify every sample of `data` (raw or preprocessed shards) into one of `labels`; write
    `output` (JSON lines: key, source, modality, label, score; a sample without image or audio
    has nulls and a reason) all at once. Returns the counts per label and in all."""
    from pipelines.dataset import check_preprocessed, shard_counts
    from pipelines.runtime import init_ray
    from pipelines.shards import expand_shards

    from .batch_embed import embedded_or_quarantined
    from .inputs import BadInput
    from .loaded import load_model

    check_request(labels, template, output)
    if workers < 1 or batch_size < 1 or gpus_per_worker < 0:
        raise UserError("--workers and --batch-size must be at least 1, --gpus-per-worker 0 or more")
    if "://" not in model:  # the actors load it too, from their own working directory
        model = os.path.abspath(model)
    loaded = load_model(model, storage_options=storage_options)  # a bad model fails here, before Ray
    try:
        label_emb = label_embeddings(loaded, labels, template)
    except BadInput as e:
        raise UserError(f"--labels: {e}") from None
    scale = logit_scale(loaded)
    shards = expand_shards(list(data), storage_options)
    preprocessed = check_preprocessed(shards, loaded.data_cfg, storage_options)
    expected = sum((shard_counts(shards, storage_options) or {}).values()) if preprocessed else None
    init_ray(dashboard=False)  # Ray Data only: see init_ray
    # every sample the reader yields, a bad one with its reason: a line in the output, not a gap
    ds = embedded_or_quarantined(model, shards, loaded.data_cfg, preprocessed=preprocessed, workers=workers,
                                 batch_size=batch_size, gpus_per_worker=gpus_per_worker,
                                 storage_options=storage_options)
    counts: Counter = Counter()
    with _atomic_lines(output) as f, _bar(expected, progress) as bar:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for line in classified_lines(table, labels, label_emb, scale):
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                counts["rejected" if line.get("detail") is not None else line["label"]] += 1
            bar.update(len(table))
    unclassified, rejected = counts.pop(None, 0), counts.pop("rejected", 0)
    return {"output": output, "samples": sum(counts.values()) + unclassified + rejected, "expected": expected,
            "unclassified": unclassified, "rejected": rejected,
            "labels": {label: counts.get(label, 0) for label in labels},
            "logit_scale": round(scale, 3), "model": loaded.origin}


def classified_lines(table: pa.Table, labels: list[str], label_emb: np.ndarray, scale: float) -> list[dict]:
    """One dict per row of an `embedded_or_quarantined` batch, in row order: a row that could
    not be read or decoded has null label and its `reason` code and `detail`."""
    n = len(table)
    keys, sources = table.column("key").to_pylist(), table.column("source").to_pylist()
    reasons = table.column("reason").to_pylist() if "reason" in table.column_names else [""] * n
    details = table.column("detail").to_pylist() if "detail" in table.column_names else [""] * n
    chosen = np.full(n, -1)  # index into CLASSIFIED, -1: neither
    vectors = np.zeros((n, label_emb.shape[1]), np.float32)
    for j, m in reversed(list(enumerate(CLASSIFIED))):  # image last: it wins where both are present
        present, values = _vectors(table.column(VECTOR_COLUMNS[m]), label_emb.shape[1])
        vectors[present], chosen[present] = values, j
    has = chosen >= 0
    best, scores = zero_shot(vectors[has], label_emb, scale)
    lines, k = [], 0
    for i in range(n):
        line = {"key": keys[i], "source": sources[i]}
        if has[i]:
            line.update(modality=CLASSIFIED[chosen[i]], label=labels[best[k]], score=round(float(scores[k, best[k]]), 6))
            k += 1
        elif reasons[i]:
            line.update(modality=None, label=None, score=None, reason=reasons[i], detail=details[i])
        else:
            line.update(modality=None, label=None, score=None, reason=NO_MODALITY)
        lines.append(line)
    return lines


def _vectors(column: pa.ChunkedArray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(present [n] bool, the present rows' vectors [p, dim]) of a FixedSizeList column with nulls."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)
    # filtered first: `flatten` of the remaining lists is exactly their values, whatever the offsets
    values = arr.filter(pa.array(present)).flatten().to_numpy(zero_copy_only=False)
    return present, np.asarray(values, np.float32).reshape(-1, dim)


class _atomic_lines:
    """A text file written under a temporary name beside `path` and renamed onto it on success:
    a crash leaves the old file (or none), never half of the new one; the temporary is removed."""

    def __init__(self, path: str):
        folder, name = os.path.split(os.path.abspath(path))
        self.path, self.tmp = path, os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")

    def __enter__(self):
        self.f = open(self.tmp, "x", encoding="utf-8")  # "x": never another's file; the umask's mode
        return self.f

    def __exit__(self, kind, value, tb):
        try:
            if kind is None:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
            if kind is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        return False


class _bar:
    """tqdm in samples (total known for preprocessed data, from its manifests), or nothing."""

    def __init__(self, total: int | None, enabled: bool):
        self.total, self.enabled, self.tqdm = total, enabled, None

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self.tqdm = tqdm(total=self.total, unit="sample", desc="classify", dynamic_ncols=True)
        return self

    def update(self, n: int) -> None:
        if self.tqdm is not None:
            self.tqdm.update(n)

    def __exit__(self, *exc):
        if self.tqdm is not None:
            self.tqdm.close()
        return False


def format_summary(result: dict) -> str:
    """The label counts, most frequent first, and what was not classified."""
    width = max(len(label) for label in result["labels"])
    classified = result['samples'] - result['unclassified'] - result.get('rejected', 0)
    lines = [f"classified {classified} of {result['samples']} samples into {result['output']}"]
    for label, n in sorted(result["labels"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {label:<{width}}  {n}")
    if result["unclassified"]:
        lines.append(f"  {result['unclassified']} sample(s) without image or audio: in the output with label null")
    if result.get("rejected"):
        lines.append(f"  {result['rejected']} sample(s) could not be read or decoded: in the output with label null, "
                     f"their reason and detail")
    if result["expected"] is not None and result["expected"] != result["samples"]:
        lines.append(f"  the manifests list {result['expected']} samples; {result['expected'] - result['samples']} "
                     f"did not decode (see the warnings above)")
    return "\n".join(lines)
