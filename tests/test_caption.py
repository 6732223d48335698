"""Captioning with the demo's trained model: beam search against greedy decoding on real
batches, the JSON-lines job through the CLI on real Ray Data, the subject named in the captions
of held-out shards made here, and the one-line errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import ray_job
from conftest import cli
from mmtrain.inference.caption import caption_rows
from mmtrain.inference.inputs import model_batch
from mmtrain.inference.loaded import load_model
from mmtrain.model.generation import beam_search, caption_scores
from tarutil import write_tar

HELD_OUT_SEED = 4242  # neither the demo's training corpus (0) nor its held-out one (12345)
SAMPLES, SUBJECTS = 32, 16
BROKEN_KEY = "broken"


@pytest.fixture(scope="module")
def heldout(demo_workdir, tmp_path_factory):
    """32 raw samples of 16 subjects in 2 shards, and each key's subject name (the generator's truth)."""
    from pipelines.corpus import make_corpus
    from pipelines.corpus_samples import GOOD, plan

    root = tmp_path_factory.mktemp("caption_heldout") / "raw"
    info = make_corpus(str(root), SAMPLES, 2, seed=HELD_OUT_SEED, subjects=SUBJECTS)
    names = info["subject_names"]
    subjects = {p.key: names[p.subject] for p in (plan(HELD_OUT_SEED, GOOD, i, SUBJECTS) for i in range(SAMPLES))}
    return root, subjects


@pytest.fixture(scope="module")
def loaded(demo_workdir):
    work, _ = demo_workdir
    return load_model(str(work / "model.safetensors"))


@pytest.fixture(scope="module")
def rows(heldout, loaded):
    """The held-out samples as the training ingest decodes them (real Ray Data)."""
    from pipelines.ingest import build_dataset
    from pipelines.shards import expand_shards

    ds = build_dataset(expand_shards([str(heldout[0])]), loaded.data_cfg, seed=0, preprocessed=False)
    batch = ds.take_batch(SAMPLES, batch_format="numpy")
    assert len(batch["key"]) == SAMPLES
    assert (batch["image_present"] | batch["audio_present"]).all()  # every row has something to caption
    return batch


def _names_subject(caption: str, name: str) -> bool:
    """"a red circle" is named by a caption containing "red circle" (any case, any article)."""
    return name.split(" ", 1)[1] in caption.lower()


def test_one_beam_gives_the_greedy_ids(rows, loaded):
    batch, tok = model_batch(rows, loaded), loaded.tokenizer
    for max_len in (None, 8):  # whole captions, and captions cut at max_len
        greedy = loaded.model.generate_caption(batch, max_len, tok.bos_id, tok.eos_id)
        beam = beam_search(loaded.model, batch, max_len, 1, tok.bos_id, tok.eos_id)
        assert beam.dtype == torch.long and beam.shape == greedy.shape, (beam.shape, greedy.shape)
        assert torch.equal(beam, greedy)
    assert greedy.shape[1] == 8 and (greedy[:, -1] != tok.eos_id).any()  # some were cut


def test_beam_search_scores_at_least_greedy(rows, loaded):
    batch, tok, model = model_batch(rows, loaded), loaded.tokenizer, loaded.model
    greedy = beam_search(model, batch, None, 1, tok.bos_id, tok.eos_id)
    beam = beam_search(model, batch, None, 4, tok.bos_id, tok.eos_id)
    # scored again by teacher forcing, not by the search's own bookkeeping
    greedy_score = caption_scores(model, batch, greedy, tok.eos_id)
    beam_score = caption_scores(model, batch, beam, tok.eos_id)
    assert torch.isfinite(greedy_score).all() and (greedy_score < 0).all()
    # the stopping rule is a heuristic (generation.py), not a guarantee per row: the mean, and
    # nearly every row (all 32 on the demo model)
    assert beam_score.mean() > greedy_score.mean(), (beam_score - greedy_score).tolist()
    assert (beam_score >= greedy_score - 1e-6).float().mean() >= 0.9, (beam_score - greedy_score).tolist()
    print(f"\nmean log-prob per token: greedy {greedy_score.mean():.4f}, 4 beams {beam_score.mean():.4f}; "
          f"{int((beam_score > greedy_score + 1e-6).sum())} of {len(beam)} captions changed for the better")


def test_every_tensor_of_the_search_is_made_on_the_models_device(rows, loaded):
    """A tensor made without device= lands on the default device; with that set to "meta" it
    cannot meet the model's CPU tensors: what a forgotten device= does on a GPU, caught on a CPU."""
    batch, tok = model_batch(rows, loaded), loaded.tokenizer
    expected = beam_search(loaded.model, batch, 12, 3, tok.bos_id, tok.eos_id)
    with torch.device("meta"):
        got = beam_search(loaded.model, batch, 12, 3, tok.bos_id, tok.eos_id)
        scores = caption_scores(loaded.model, batch, got, tok.eos_id)
    assert got.device.type == "cpu" and scores.device.type == "cpu" and torch.equal(got, expected)


def test_rows_without_image_or_audio_get_an_empty_caption(rows, loaded):
    few = {k: np.copy(v[:4]) for k, v in rows.items()}
    before = caption_rows(loaded, few, beams=2)
    few["image_present"][0] = few["audio_present"][0] = False  # row 0: only its caption is left
    after = caption_rows(loaded, few, beams=2)
    assert after[0] == "" and before[0] != ""
    assert after[1:] == before[1:]
    assert caption_rows(loaded, {k: v[:0] for k, v in few.items()}) == []


@pytest.fixture(scope="module")
def job(demo_workdir, heldout, tmp_path_factory):
    """`ray_job.py caption` over the held-out raw shards with the run directory, 3 beams."""
    work, _ = demo_workdir
    out = tmp_path_factory.mktemp("caption_out") / "captions.jsonl"
    broken = tmp_path_factory.mktemp("caption_broken") / "shard-broken.tar"  # one sample whose image is no image
    write_tar(broken, [(f"{BROKEN_KEY}.jpg", b"not a jpeg at all"), (f"{BROKEN_KEY}.txt", b"a photo of a red circle")])
    r = cli("caption", "--model", work / "run", "--data", heldout[0], broken, "--output", out, "--beams", 3,
            "--workers", 2, "--batch-size", 8)
    return out, r


def test_the_job_writes_one_line_per_sample(job, heldout):
    out, r = job
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == SAMPLES + 1
    bad = [line for line in lines if line["key"] == BROKEN_KEY]  # reported with its reason, not dropped
    assert len(bad) == 1 and bad[0]["caption"] is None and bad[0]["reason"] and bad[0]["detail"], bad
    lines = [line for line in lines if line["key"] != BROKEN_KEY]
    assert all(set(line) == {"key", "source", "caption"} for line in lines)
    assert sorted(line["key"] for line in lines) == sorted(heldout[1])
    assert {line["source"] for line in lines} == {str(heldout[0] / f"shard-00000{i}.tar") for i in (0, 1)}
    assert os.listdir(out.parent) == [out.name]  # no temporary left beside it
    assert f"captioned {SAMPLES + 1} samples" in r.stdout and "(beams 3," in r.stdout
    assert "1 could not be read or decoded" in r.stdout
    examples = [line for line in r.stdout.splitlines() if line.startswith("  ")]
    assert len(examples) == 2 and all(e.split(": ", 1)[0].strip() in heldout[1] for e in examples)


def test_half_the_captions_name_the_subject(job, heldout, rows, loaded):
    out, _ = job
    subjects = heldout[1]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    lines = [line for line in lines if line["key"] in subjects]
    beam_hits = sum(_names_subject(line["caption"], subjects[line["key"]]) for line in lines)
    greedy = caption_rows(loaded, rows)
    greedy_hits = sum(_names_subject(c, subjects[k]) for c, k in zip(greedy, rows["key"]))
    print(f"\ncaptions naming the right subject: 3 beams {beam_hits}/{len(lines)}, greedy {greedy_hits}/{SAMPLES}; "
          f"e.g. {lines[0]['caption']!r} for {subjects[lines[0]['key']]!r}")
    assert beam_hits >= len(lines) / 2
    assert greedy_hits >= SAMPLES / 2


def test_bad_arguments_are_one_line_errors(demo_workdir, heldout, tmp_path, capsys):
    work, _ = demo_workdir
    model, data = str(work / "model.safetensors"), str(heldout[0])
    (tmp_path / "garbage.safetensors").write_bytes(b"not a model")
    (tmp_path / "empty_run").mkdir()
    out = str(tmp_path / "c.jsonl")
    cases = [
        (["--model", model, "--beams", "0"], "--beams must be at least 1, got 0"),
        (["--model", model, "--max-len", "1"], "--max-len must be at least 2"),
        (["--model", model, "--output", str(tmp_path / "nosuch" / "c.jsonl")], "the folder"),
        (["--model", model, "--output", str(tmp_path)], "is a folder"),
        (["--model", str(tmp_path / "garbage.safetensors")], "not a model exported by"),
        (["--model", str(tmp_path / "empty_run")], "no complete checkpoint"),
        (["--model", model, "--output", str(heldout[0] / "shard-000000.tar")], "is one of the input shards"),
    ]
    for args, message in cases:
        argv = ["caption", "--data", data, "--output", out, *args]  # a later --output wins
        assert ray_job.main(argv) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
    assert sorted(os.listdir(tmp_path)) == ["empty_run", "garbage.safetensors"]  # nothing written
