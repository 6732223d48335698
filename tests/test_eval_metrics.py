"""`evaluate`'s metrics (mmtrain/eval_metrics.py) on hand-computed cases, and `evaluate` itself
end to end: the demo's model through the CLI on held-out shards made here, embedded by the
actor pool of `embed`'s path, against the single-process loop on the same shards."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from mmtrain.eval_metrics import corpus_bleu, named_label, recall_at_k, retrieval_recalls, zero_shot_accuracy

from conftest import ROOT, cli

LABELS = ["a red circle", "a grey square", "a striped red circle", "a blue triangle"]


# ------------------------------------------------------------------------------ recall@k and ties

def test_distinct_embeddings_retrieve_their_own_row() -> None:
    assert recall_at_k(np.eye(16), np.eye(16)) == {1: 1.0, 5: 1.0}


def test_a_collapsed_encoder_scores_chance_not_one() -> None:
    same = np.full((16, 8), 1 / math.sqrt(8), np.float32)  # every embedding equal: every candidate ties
    r = recall_at_k(same, same)
    assert r[1] == pytest.approx(1 / 16) and r[5] == pytest.approx(5 / 16)


def test_a_permutation_scores_zero_at_one() -> None:
    q = np.eye(16)
    r = recall_at_k(q, q[np.roll(np.arange(16), 1)])  # row i's target is someone else's embedding
    assert r[1] == 0.0
    # one candidate scores higher, the 14 others tie with the correct one: rank uniform on 1..15
    assert r[5] == pytest.approx(4 / 15)


def test_ties_are_broken_at_random_in_expectation() -> None:
    e = np.eye(2)
    emb = np.stack([e[0], e[0], e[1]])  # rows 0 and 1 tie with each other, row 2 stands alone
    assert recall_at_k(emb, emb, ks=(1, 2)) == pytest.approx({1: (0.5 + 0.5 + 1) / 3, 2: 1.0})
    # float noise far below the tolerance is a tie too, not a win
    noisy = emb + np.array([[0, 1e-8], [0, 0], [0, 0]])
    assert recall_at_k(noisy, emb, ks=(1,))[1] == pytest.approx(2 / 3)


def test_recall_is_the_same_whatever_the_chunk() -> None:
    rng = np.random.default_rng(0)
    q, t = rng.standard_normal((37, 8)), rng.standard_normal((37, 8))
    q, t = q / np.linalg.norm(q, axis=1, keepdims=True), t / np.linalg.norm(t, axis=1, keepdims=True)
    assert recall_at_k(q, t, chunk=5) == pytest.approx(recall_at_k(q, t))


def test_directions_need_both_modalities_in_two_samples() -> None:
    emb = {m: np.eye(4, dtype=np.float32) for m in ("image", "text", "audio")}
    present = {"image": np.array([1, 1, 1, 0], bool), "text": np.array([1, 1, 0, 1], bool),
               "audio": np.array([1, 0, 0, 0], bool)}
    r = retrieval_recalls(emb, present)
    assert r["image_to_text/candidates"] == r["text_to_image/candidates"] == 2
    assert r["image_to_text/recall@1"] == 1.0
    assert not any(k.startswith("audio_") or "_to_audio" in k for k in r)


# ------------------------------------------------------------------------------ zero-shot

def test_named_label_takes_whole_words_and_the_longest_name() -> None:
    assert named_label("A photo of a red circle", LABELS) == 0
    assert named_label("a striped red circle on a plain background", LABELS) == 2
    assert named_label("a red circles party", LABELS) is None           # not the whole word
    assert named_label("a red circle next to a grey square", LABELS) is None  # two subjects
    assert named_label("一张红色的圆的照片", LABELS) is None                # names none of them
    assert named_label("a red circle", ["circle", "red circle"]) == 1   # "circle" is inside the longer name


def test_zero_shot_accuracy_on_a_fabricated_geometry() -> None:
    from mmtrain.inference.classify import zero_shot

    label_emb = np.eye(4, dtype=np.float32)  # label j points along axis j
    captions = ["a red circle", "a grey square", "a blue triangle", "an unnamed thing",
                "a striped red circle", "a red circle and a grey square"]
    truth = [named_label(c, LABELS) for c in captions]
    assert truth == [0, 1, 3, None, 2, None]
    emb = np.array([[1, .3, 0, 0], [.2, 1, 0, 0], [0, 0, 1, .1],  # row 2 lies nearer label 2 than its own 3
                    [1, 0, 0, 0], [0, .1, 1, 0], [0, 0, 0, 1]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    best, scores = zero_shot(emb, label_emb)
    assert list(best[:3]) == [0, 1, 2] and scores.shape == (6, 4)
    assert zero_shot_accuracy(best, truth) == (0.75, 4)  # rows 0, 1, 4 right, row 2 wrong; 3 and 5 unnamed
    assert zero_shot_accuracy(best, [None] * 6) == (None, 0)


# ------------------------------------------------------------------------------ BLEU-4

def test_bleu_of_identical_captions_is_one() -> None:
    assert corpus_bleu(["a photo of a red circle", "A grey square."], ["a photo of a red circle", "a grey square."]) \
        == pytest.approx(1.0)


def test_bleu_without_a_shared_4gram_is_zero() -> None:
    assert corpus_bleu(["a b c d e"], ["a b c x d e"]) == 0.0  # 1-, 2-, 3-grams shared, no 4-gram
    assert corpus_bleu(["the cat sat"], ["the cat sat down"]) == 0.0  # no 4-gram at all
    assert corpus_bleu([""], ["a red circle"]) == 0.0


def test_bleu_hand_computed() -> None:
    # precisions 5/6 ("the" clipped to 1), 3/5, 2/4, 1/3; same length: no brevity penalty
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx((1 / 12) ** 0.25)
    # every precision 1, 5 tokens for 6: brevity penalty exp(1 - 6/5)
    assert corpus_bleu(["the cat sat on the"], ["the cat sat on the mat"]) == pytest.approx(math.exp(-0.2))
    # corpus level: n-gram counts summed over the pairs before dividing (5/9, 4/7, 3/5, 2/3),
    # not the mean of the sentence scores (1 and 0)
    value = corpus_bleu(["a b c d e", "v w x y"], ["a b c d e", "f g h i"])
    assert value == pytest.approx((5 / 9 * 4 / 7 * 3 / 5 * 2 / 3) ** 0.25)


# ------------------------------------------------------------------------------ labels from the data

def test_labels_come_from_the_corpus_file_and_a_bad_one_is_one_line(tmp_path) -> None:
    from mmtrain.evaluate import corpus_labels
    from pipelines.corpus import make_corpus
    from pipelines.corpus_samples import subject_names
    from pipelines.errors import UserError

    make_corpus(str(tmp_path / "raw"), 2, 1, seed=3)
    assert corpus_labels([str(tmp_path / "raw")]) == subject_names(16)
    assert corpus_labels([str(tmp_path / "raw" / "shard-000000.tar")]) is None  # a shard, not a folder
    elsewhere = tmp_path / "away"
    elsewhere.mkdir()
    (elsewhere / "_job.json").write_text(json.dumps({"inputs": ["http://127.0.0.1:9/corpus"]}))
    assert corpus_labels([str(elsewhere)]) is None  # the data's own storage only: no request is made
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "_corpus.json").write_text(json.dumps({"subject_names": ["ok", 7]}))
    with pytest.raises(UserError, match="subject_names must be a list"):
        corpus_labels([str(bad)])


def test_a_template_without_a_slot_is_a_one_line_error(tmp_path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "evaluate", "--model", str(tmp_path / "none"),
                        "--data", str(tmp_path), "--template", "a photo"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--template must hold one {}" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def fresh_heldout(tmp_path_factory):
    """32 raw samples of the 16 subjects in 2 shards, from a seed neither the demo's training
    nor its held-out set used."""
    from pipelines.corpus import make_corpus

    root = tmp_path_factory.mktemp("fresh_heldout") / "raw"
    make_corpus(str(root), 32, 2, seed=4242)
    return root


def test_evaluate_cli_with_the_demo_model(demo_workdir, fresh_heldout, tmp_path) -> None:
    work, _ = demo_workdir
    from mmtrain.evaluate import corpus_labels
    from pipelines.corpus_samples import subject_names

    # the demo's preprocessed held-out folder leads back to its raw corpus's subject names
    assert corpus_labels([str(work / "heldout")]) == subject_names(16)
    out = tmp_path / "eval.json"
    cli("evaluate", "--model", work / "model.safetensors", "--data", fresh_heldout, "--workers", "2",
        "--batch-size", "8", "--output", out)
    r = json.loads(out.read_text())
    assert r["samples"] == 32 and r["checkpoint"] == "model.safetensors"
    for direction in ("image_to_text", "text_to_image", "audio_to_text"):
        assert 0 <= r[f"{direction}/recall@1"] <= r[f"{direction}/recall@5"] <= 1
    assert r["zero_shot/labels"] == 16 and 0 < r["zero_shot/image_samples"] <= 32
    assert r["zero_shot/image_accuracy"] >= 0.8  # the bar (0.93 measured on these 32 samples)
    assert 0 <= r["zero_shot/audio_accuracy"] <= 1
    assert r["caption_loss"] > 0 and 0 < r["caption/samples"] <= 32
    assert 0 < r["caption/bleu4"] <= 1
    assert r["caption/names_subject"] >= 0.5  # the bar (0.87 measured)
    assert r["image_to_text/recall@1"] == single_process_recall(work / "model.safetensors", fresh_heldout)


def single_process_recall(model: str, data) -> float:
    """image->text recall@1 as the driver computes it in one process (what `evaluate` did before
    the actor pool): the distributed gather must line every row's vectors up the same way."""
    from mmtrain.eval_metrics import retrieval_recalls
    from mmtrain.inference.inputs import embed_rows
    from mmtrain.inference.loaded import load_model
    from pipelines.ingest import build_dataset
    from pipelines.shards import expand_shards

    loaded = load_model(str(model))
    ds = build_dataset(expand_shards([str(data)]), loaded.data_cfg, seed=0, preprocessed=False)
    embs, present = {m: [] for m in ("image", "text", "audio")}, {m: [] for m in ("image", "text", "audio")}
    for rows in ds.iter_batches(batch_size=8, batch_format="numpy"):
        for m, v in embed_rows(rows, loaded).items():
            embs[m].append(v)
            present[m].append(np.asarray(rows[f"{m}_present"], bool))
    return retrieval_recalls({m: np.concatenate(v) for m, v in embs.items()},
                             {m: np.concatenate(v) for m, v in present.items()})["image_to_text/recall@1"]
