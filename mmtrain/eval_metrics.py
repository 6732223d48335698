"""The numbers `evaluate` reports, as pure functions of embeddings and strings: retrieval
recall@k (ties count against the model), zero-shot accuracy on the subjects the captions name,
and corpus BLEU-4 of generated captions against the held-out ones."""
from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

MODALITIES = ("image", "text", "audio")
KS = (1, 5)
# cosine similarities closer than this are a tie: float32 embeddings computed in different
# batches differ by ~1e-7, and a ranking decided below that is noise, not the model
TIE_TOLERANCE = 1e-6


def recall_at_k(query, target, ks=KS, chunk: int = 1024) -> dict[int, float]:
    """Row i of `query` should retrieve row i of `target` (L2-normalized embeddings [N, D]).

    A candidate that scores the same as the correct target (within TIE_TOLERANCE) is a tie,
    and ties are broken at random: the value is the expected recall over the tie-breaks. With
    g candidates scoring higher and t other candidates tied, the correct one's rank is uniform
    over g..g+t, so it is in the top k with probability clamp(k - g, 0, t + 1) / (t + 1). A
    collapsed encoder (all embeddings equal) scores chance, min(k, N) / N, never 1; an
    optimistic rule (`sim > correct`) would give it 1. Query rows are taken `chunk` at a time:
    memory stays chunk x N, not N x N."""
    q = np.asarray(query, np.float32)
    t = np.asarray(target, np.float32)
    if q.shape != t.shape or q.ndim != 2:
        raise ValueError(f"query and target must both be [N, D], got {q.shape} and {t.shape}")
    n = len(q)
    hits = {k: 0.0 for k in ks}
    for start in range(0, n, chunk):
        sim = q[start:start + chunk] @ t.T                       # [c, N]
        rows = np.arange(len(sim))
        correct = sim[rows, start + rows][:, None]
        others = np.ones_like(sim, dtype=bool)
        others[rows, start + rows] = False                       # the correct target is not its own rival
        higher = ((sim > correct + TIE_TOLERANCE) & others).sum(axis=1)
        tied = ((np.abs(sim - correct) <= TIE_TOLERANCE) & others).sum(axis=1)
        for k in ks:
            hits[k] += float((np.clip(k - higher, 0, tied + 1) / (tied + 1)).sum())
    return {k: hits[k] / n if n else 0.0 for k in ks}


def retrieval_recalls(embs: dict[str, np.ndarray], present: dict[str, np.ndarray], digits: int = 4) -> dict:
    """`{q}_to_{t}/recall@k` and `{q}_to_{t}/candidates` for every direction whose two
    modalities are both present in at least 2 samples (candidates: those samples)."""
    result = {}
    for q in MODALITIES:
        for t in MODALITIES:
            both = present[q] & present[t]
            if q == t or int(both.sum()) < 2:
                continue
            for k, r in recall_at_k(embs[q][both], embs[t][both]).items():
                result[f"{q}_to_{t}/recall@{k}"] = round(r, digits)
            result[f"{q}_to_{t}/candidates"] = int(both.sum())
    return result


# ------------------------------------------------------------------------------ zero-shot

def named_label(caption: str, labels: list[str]) -> int | None:
    """The index of the one label `caption` names (case-insensitive, whole words; a label
    inside a longer named label does not count: "a red circle" in "a striped red circle"), or
    None when it names none or several."""
    text = caption.lower()
    found = [i for i, label in enumerate(labels)
             if label.strip() and re.search(r"(?<!\w)" + re.escape(label.strip().lower()) + r"(?!\w)", text)]
    longest = [i for i in found
               if not any(j != i and labels[i].strip().lower() in labels[j].strip().lower()
                          and len(labels[j].strip()) > len(labels[i].strip()) for j in found)]
    return longest[0] if len(longest) == 1 else None


def zero_shot_accuracy(best: np.ndarray, truth: list[int | None]) -> tuple[float | None, int]:
    """(accuracy, samples) over the samples with a known label (`truth` not None): how often
    the predicted label index `best` is the named one; (None, 0) without any."""
    keep = [i for i, t in enumerate(truth) if t is not None]
    if not keep:
        return None, 0
    return float(np.mean([int(best[i]) == truth[i] for i in keep])), len(keep)


# ------------------------------------------------------------------------------ BLEU-4

_TOKEN = re.compile(r"\w+|[^\w\s]")


def bleu_tokens(text: str) -> list[str]:
    """Lower-cased words and punctuation marks (the 13a tokenizer's idea, without its tables)."""
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(candidates: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus-level BLEU (Papineni et al. 2002), one reference per candidate: the geometric mean
    of the modified (clipped) n-gram precisions for n = 1..max_n, summed over the corpus before
    dividing, times the brevity penalty exp(1 - r/c) when the candidates are shorter in all
    (c total candidate tokens, r total reference tokens). 0 when some precision is 0 (no
    smoothing, as the paper and sacreBLEU's default) or there are no candidate tokens.

    Our own ~20 lines rather than sacreBLEU or NLTK: neither is a dependency of the project,
    and the formula is short enough to pin with hand-computed cases (tests/test_eval_metrics.py)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} references")
    matched, total = [0] * max_n, [0] * max_n
    c_len = r_len = 0
    for cand, ref in zip(candidates, references):
        c, r = bleu_tokens(cand), bleu_tokens(ref)
        c_len, r_len = c_len + len(c), r_len + len(r)
        for n in range(1, max_n + 1):
            cn, rn = _ngrams(c, n), _ngrams(r, n)
            matched[n - 1] += sum(min(count, rn[g]) for g, count in cn.items())
            total[n - 1] += sum(cn.values())
    if c_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
    brevity = 1.0 if c_len > r_len else math.exp(1 - r_len / c_len)
    return brevity * math.exp(log_precision)
