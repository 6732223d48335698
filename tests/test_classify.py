"""Zero-shot classification (`ray_job.py classify`): the demo's model on held-out shards made
here (another seed than the demo's corpus), through real Ray Data and the actor pool; the
scoring on known geometry; the one-line errors."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest

from conftest import cli
from tarutil import write_tar

SEED = 4321        # the demo trains on seed 0 and holds out seed 1
SAMPLES = 64       # 4 of each of the 16 subjects
TEXT_ONLY_KEY = "lonely"
BROKEN_KEY = "broken"


@pytest.fixture(scope="module")
def heldout(demo_workdir, tmp_path_factory):
    """64 raw held-out samples in 4 shards, plus a shard with one text-only sample (nothing to
    classify), and each sample's subject from the corpus's own plan."""
    from pipelines.corpus import make_corpus
    from pipelines.corpus_samples import GOOD, plan

    work, _ = demo_workdir
    root = tmp_path_factory.mktemp("classify")
    info = make_corpus(str(root / "raw"), SAMPLES, 4, seed=SEED)
    write_tar(root / "raw" / "shard-text-only.tar", [(f"{TEXT_ONLY_KEY}.txt", b"a photo of a red circle")])
    write_tar(root / "raw" / "shard-broken.tar", [(f"{BROKEN_KEY}.jpg", b"not a jpeg at all"),
                                                  (f"{BROKEN_KEY}.txt", b"a photo of a red circle")])
    names = info["subject_names"]
    truth = {p.key: names[p.subject] for p in (plan(SEED, GOOD, i, len(names)) for i in range(SAMPLES))}
    return {"model": work / "model.safetensors", "data": root / "raw", "names": names, "truth": truth,
            "root": root}


@pytest.fixture(scope="module")
def classified(heldout):
    out = heldout["root"] / "labels.jsonl"
    r = cli("classify", "--model", heldout["model"], "--data", heldout["data"], "--labels", ",".join(heldout["names"]),
            "--output", out, "--workers", 2, "--batch-size", 16)
    return r, [json.loads(line) for line in out.read_text().splitlines()], out


def test_zero_shot_accuracy_on_heldout_shards(heldout, classified):
    _, lines, _ = classified
    truth = heldout["truth"]
    scored = [line for line in lines if line["key"] in truth]
    correct = sum(line["label"] == truth[line["key"]] for line in scored)
    by_modality = {m: sum(line["modality"] == m for line in scored) for m in ("image", "audio")}
    accuracy = correct / len(truth)
    print(f"zero-shot accuracy {accuracy:.3f} ({correct}/{len(truth)}; classified by {by_modality})")
    assert len(scored) == len(truth)
    assert accuracy >= 0.8, (accuracy, by_modality)


def test_jsonl_has_one_line_per_sample_and_counts_on_console(heldout, classified):
    r, lines, out = classified
    names, truth = heldout["names"], heldout["truth"]
    keys = [line["key"] for line in lines]
    assert len(lines) == SAMPLES + 2 and sorted(keys) == sorted([*truth, TEXT_ONLY_KEY, BROKEN_KEY])
    for line in lines:
        assert {"key", "source", "label", "score", "modality"} <= set(line)
        assert line["source"].endswith(".tar")
        if line["key"] == TEXT_ONLY_KEY:  # reported, not skipped
            assert line["label"] is None and line["modality"] is None and "no image or audio" in line["reason"]
        elif line["key"] == BROKEN_KEY:  # reported with the reader's or decoder's reason, not dropped
            assert line["label"] is None and line["reason"] and line["detail"], line
        else:
            assert line["label"] in names and line["modality"] in ("image", "audio")
            assert 1 / len(names) <= line["score"] <= 1  # the best of a softmax over 16 labels
    # the console: a count per label (matching the file) and the unclassified sample
    assert f"classified {SAMPLES} of {SAMPLES + 2} samples" in r.stdout
    for name in names:
        n = sum(line["label"] == name for line in lines)
        assert any(row.split() == [*name.split(), str(n)] for row in r.stdout.splitlines()), (name, r.stdout)
    assert "1 sample(s) without image or audio" in r.stdout
    assert "1 sample(s) could not be read or decoded" in r.stdout
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_label_embeddings_follow_the_template(heldout):
    from mmtrain.inference.classify import label_embeddings, logit_scale, prompts
    from mmtrain.inference.inputs import BadInput
    from mmtrain.inference.loaded import load_model

    loaded = load_model(str(heldout["model"]))
    names = heldout["names"][:4]
    emb = label_embeddings(loaded, names)
    assert emb.shape == (4, loaded.embed_dim) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert prompts(names, "a photo of {}")[0] == "a photo of a red circle"  # a caption of the corpus
    bare = label_embeddings(loaded, names, "{}")
    assert not np.allclose(emb, bare)  # the template reaches the text tower
    assert 1 < logit_scale(loaded) <= 100
    with pytest.raises(BadInput, match="label 'x'"):
        label_embeddings(loaded, ["a red circle", "x"], "{}")  # "x": shorter than a caption may be


def test_zero_shot_known_geometry():
    from mmtrain.inference.classify import zero_shot

    labels = np.eye(3, dtype=np.float32)
    emb = np.array([[0.9, 0.1, 0], [0, 0, 2], [0.1, 1, 0.05], [-1, 0, 0]], np.float32)
    best, scores = zero_shot(emb, labels, scale=10)
    assert best.tolist() == [0, 2, 1, 1]  # the last: equally far from labels 1 and 2, the first wins
    assert scores.shape == (4, 3) and np.allclose(scores.sum(axis=1), 1, atol=1e-6)
    # row 1 is label 2 exactly (cosine 1 vs 0 and 0): softmax of [0, 0, 10]
    assert scores[1, 2] == pytest.approx(math.exp(10) / (math.exp(10) + 2), rel=1e-5)
    # a hotter scale sharpens the same answer; scale 0 knows nothing
    _, sharper = zero_shot(emb, labels, scale=100)
    assert sharper[0, 0] > scores[0, 0]
    assert np.allclose(zero_shot(emb, labels, scale=0)[1], 1 / 3)
    # a vector without direction gets no preference
    assert np.allclose(zero_shot(np.zeros((1, 3)), labels)[1], 1 / 3)
    with pytest.raises(ValueError, match="zero_shot"):
        zero_shot(emb, np.eye(4))


def test_output_is_replaced_whole_or_not_at_all(tmp_path):
    from mmtrain.inference.classify import _atomic_lines

    out = tmp_path / "labels.jsonl"
    out.write_text("previous\n")
    with pytest.raises(RuntimeError):
        with _atomic_lines(str(out)) as f:
            f.write('{"half": ')
            raise RuntimeError("the job died here")
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl"]
    with _atomic_lines(str(out)) as f:
        f.write("new\n")
    assert out.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl"]


def _error(*args) -> str:
    """`ray_job.py classify ARGS` in this process (the CLI's own error handling, without a
    process start per case): exit 2 and one line on stderr."""
    import ray_job

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = ray_job.main(["classify", *map(str, args)])
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()[-3000:]
    return lines[0]


@pytest.mark.parametrize("labels, template, says", [
    ("a red circle", "a photo of {}", "at least 2 labels"),
    ("a red circle,,a blue square", "a photo of {}", "a label is empty"),
    ("a red circle,a blue square, a red circle", "a photo of {}", "'a red circle' is given twice"),
    ("a red circle,a blue square", "a photo of", "no {}"),
    ("a red circle,x", "{}", "label 'x'"),  # a prompt the text transform refuses
])
def test_bad_labels_and_templates_are_one_line_errors(heldout, tmp_path, labels, template, says):
    line = _error("--model", heldout["model"], "--data", heldout["data"], "--labels", labels, "--template", template,
                  "--output", tmp_path / "out.jsonl")
    assert says in line
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bad_output_and_model_are_one_line_errors(heldout, tmp_path):
    args = ("--data", heldout["data"], "--labels", "a red circle,a blue square")
    model = ("--model", heldout["model"])
    assert "does not exist" in _error(*model, *args, "--output", tmp_path / "missing" / "out.jsonl")
    assert "is a folder" in _error(*model, *args, "--output", tmp_path)
    out = ("--output", tmp_path / "out.jsonl")
    assert "no complete checkpoint" in _error("--model", tmp_path, *args, *out)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    assert "not a model exported" in _error("--model", junk, *args, *out)
    assert "no such file" in _error("--model", tmp_path / "gone.safetensors", *args, *out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors"]
