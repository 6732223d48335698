"""`ray_job.py embed`: the corpus -> a Lance table of vectors + a quarantine table, on the session's
real Ray (Ray Data, an actor pool) with the demo's trained model; exactly once across a `kill -9`
and a re-run (tests/kill_at.py), resumable, and refusing an output that is not its own.

The reference for the vectors is `mmtrain.inference.inputs.embed_rows` on the same shards decoded
in this process (the tar reader and the training ingest's decoder, no Ray)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import ROOT

KILL_AT = ROOT / "tests" / "kill_at.py"
SAMPLES, SHARDS = 40, 4


def run_embed(*args, via: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(via or [str(ROOT / "ray_job.py")]), "embed", *map(str, args), "--workers", "2",
           "--batch-size", "8", "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def embed_ok(*args) -> subprocess.CompletedProcess:
    r = run_embed(*args)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def table(out, name="embeddings.lance") -> pa.Table:
    import lance

    return lance.dataset(os.path.join(out, name)).to_table()


def reader_samples(folder) -> list:
    """Every sample the tar reader yields from the folder's shards, errors included."""
    from pipelines.shards import expand_shards
    from pipelines.source import iter_tar_samples

    return [s for shard in expand_shards([str(folder)]) for s in iter_tar_samples(shard)]


@pytest.fixture(scope="module")
def model(demo_workdir):
    return str(demo_workdir[0] / "model.safetensors")


@pytest.fixture(scope="module")
def corpus(ray_cluster, tmp_path_factory):
    from pipelines.corpus import make_corpus

    root = tmp_path_factory.mktemp("embed_corpus") / "raw"
    make_corpus(str(root), SAMPLES, SHARDS, seed=1414)
    return root


@pytest.fixture(scope="module")
def defects(ray_cluster, tmp_path_factory):
    from pipelines.corpus import make_corpus

    root = tmp_path_factory.mktemp("embed_defects") / "raw"
    info = make_corpus(str(root), 16, SHARDS, seed=1415, defects=True)
    return root, info


@pytest.fixture(scope="module")
def embedded(model, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "out"
    r = embed_ok("--model", model, "--data", corpus, "--output", out)
    return out, r


@pytest.fixture(scope="module")
def defects_embedded(model, defects, tmp_path_factory):
    out = tmp_path_factory.mktemp("defects_embedded") / "out"
    embed_ok("--model", model, "--data", defects[0], "--output", out)
    return out


def reference_vectors(model: str, folder) -> dict[str, dict]:
    """id -> {modality: vector or None, caption}: embed_rows on the decoded samples, in this process."""
    from mmtrain.inference.inputs import embed_rows
    from mmtrain.inference.loaded import load_model
    from pipelines.datasource import sample_row, sample_schema
    from pipelines.ingest import RAW_COLUMNS, decode_batch

    loaded = load_model(model)
    rows = [sample_row(s, RAW_COLUMNS) for s in reader_samples(folder)]
    decoded = decode_batch(pa.Table.from_pylist(rows, schema=sample_schema(RAW_COLUMNS)), loaded.data_cfg)
    emb = embed_rows(decoded, loaded)
    ref = {}
    for i, (source, key) in enumerate(zip(decoded["source"], decoded["key"])):
        ref[f"{source}#{key}"] = {
            **{m: emb[m][i] if decoded[f"{m}_present"][i] else None for m in ("image", "text", "audio")},
            "caption": decoded["text"][i] if decoded["text_present"][i] else None}
    return ref


def test_one_row_per_sample_with_the_models_vectors(model, corpus, embedded):
    out, r = embedded
    got = table(out)
    ids = got["id"].to_pylist()
    samples = reader_samples(corpus)
    assert len(samples) == SAMPLES
    assert sorted(ids) == sorted(f"{s.source}#{s.key}" for s in samples)  # each sample, once
    assert got["shard"].to_pylist() == got["source"].to_pylist()
    assert table(out, "quarantine.lance").num_rows == 0
    info = json.loads((out / "embed.json").read_text())
    assert info["counts"]["embedded"] == SAMPLES and info["complete"] and info["model"]["origin"] == model
    assert info["this_run"] == {**info["this_run"], "embedded_shards": SHARDS, "skipped_shards": 0}
    assert f"{SAMPLES} samples embedded" in r.stdout.strip().splitlines()[-1]

    ref = reference_vectors(model, corpus)
    dim = info["model"]["embed_dim"]
    rows = got.to_pylist()
    nulls = 0
    for row in rows:
        want = ref[row["id"]]
        assert row["caption"] == want["caption"]
        for m in ("image", "text", "audio"):
            vec = row[f"{m}_vector"]
            if want[m] is None:
                assert vec is None, (row["id"], m)
                nulls += 1
                continue
            assert len(vec) == dim
            np.testing.assert_allclose(np.asarray(vec, np.float32), want[m], atol=1e-5, err_msg=f"{row['id']} {m}")
    assert nulls >= 1  # the corpus has samples without one modality: their vector is null


def test_a_rerun_skips_the_shards_already_embedded(model, corpus, tmp_path):
    out = tmp_path / "out"
    shards = sorted(str(p) for p in corpus.glob("shard-*.tar"))
    embed_ok("--model", model, "--data", *shards[:2], "--output", out)
    first = table(out)
    r = embed_ok("--model", model, "--data", corpus, "--output", out)
    info = json.loads((out / "embed.json").read_text())
    assert info["this_run"]["embedded_shards"] == SHARDS - 2 and info["this_run"]["skipped_shards"] == 2
    assert "2 already done" in r.stdout
    got = table(out)
    assert got.num_rows == SAMPLES and len(set(got["id"].to_pylist())) == SAMPLES
    # the first run's rows are there as they were
    assert got.filter(pc.is_in(got["shard"], value_set=first["shard"].unique())).sort_by("id").equals(first.sort_by("id"))
    r = embed_ok("--model", model, "--data", corpus, "--output", out)
    assert "0 shards embedded now, 4 already done" in r.stdout
    assert table(out).num_rows == SAMPLES


def test_planted_defects_are_quarantined_with_their_reasons(defects, defects_embedded):
    from pipelines import reasons

    root, info = defects
    vectors, quarantine = table(defects_embedded), table(defects_embedded, "quarantine.lance")
    samples = reader_samples(root)
    assert vectors.num_rows + quarantine.num_rows == len(samples)  # every sample in one of the two
    assert len(set(vectors["id"].to_pylist())) == vectors.num_rows
    where = Counter((os.path.basename(s), r) for s, r in zip(quarantine["shard"].to_pylist(),
                                                               quarantine["reason"].to_pylist()))
    for d in info["defects"]:
        if d["defect"] == "duplicate_content":  # a copy is still a sample to embed
            assert any(k.endswith("#" + d["key"]) for k in vectors["id"].to_pylist())
            continue
        assert where[(d["shard"], d["reason"])] >= 1, d
    codes = {v for k, v in vars(reasons).items() if k.isupper() and isinstance(v, str)}
    assert set(quarantine["reason"].to_pylist()) <= codes
    assert sum(1 for d in info["defects"] if d["defect"] != "duplicate_content") == quarantine.num_rows
    good = {f"{s.source}#{s.key}" for s in samples if s.error is None}
    assert set(vectors["id"].to_pylist()) <= good


def test_kill_9_then_a_rerun_leaves_every_id_exactly_once(model, defects, defects_embedded, tmp_path):
    root, _ = defects
    out = tmp_path / "out"
    # one shard per commit; killed as the second commit of vectors begins: the first shard is in,
    # the second's quarantine rows are committed, its vectors are written but not committed
    r = run_embed("--model", model, "--data", root, "--output", out, "--shards-per-commit", "1",
                  via=[str(KILL_AT), "lance-commit:embeddings.lance#2", str(out), "--"])
    assert r.returncode == -9 and "kill_at: killed at Lance commit #2" in r.stderr, r.stderr[-3000:]
    before_v, before_q = table(out), table(out, "quarantine.lance")
    in_vectors = set(before_v["shard"].to_pylist())
    assert len(in_vectors) == 1
    assert set(before_q["shard"].to_pylist()) - in_vectors  # the window between the two commits
    assert unreferenced_files(out / "embeddings.lance")  # the killed commit's fragment files

    embed_ok("--model", model, "--data", root, "--output", out, "--shards-per-commit", "1")
    ref_v, ref_q = table(defects_embedded), table(defects_embedded, "quarantine.lance")
    got_v, got_q = table(out), table(out, "quarantine.lance")
    assert Counter(got_v["id"].to_pylist()) == Counter(ref_v["id"].to_pylist())
    assert max(Counter(got_v["id"].to_pylist()).values()) == 1
    pairs = lambda t: Counter(zip(t["id"].to_pylist(), t["reason"].to_pylist()))  # noqa: E731
    assert pairs(got_q) == pairs(ref_q)
    for name in ("embeddings.lance", "quarantine.lance"):  # the re-run left no orphaned file
        assert unreferenced_files(out / name) == set(), name


def unreferenced_files(uri) -> set[str]:
    """Data files of a Lance dataset that no version references (a killed commit's)."""
    import lance

    referenced = set()
    for v in lance.dataset(str(uri)).versions():
        ds = lance.dataset(str(uri), version=v["version"])
        referenced |= {os.path.basename(f.path) for fragment in ds.get_fragments() for f in fragment.data_files()}
    return {p.name for p in (uri / "data").iterdir()} - referenced


def test_an_output_with_foreign_files_is_refused_in_one_line(model, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run_embed("--model", model, "--data", corpus, "--output", out)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-3000:]
    assert "holds no embed output" in r.stderr
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_an_output_of_another_model_is_refused_in_one_line(model, corpus, embedded, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(model, framework="pt") as f:
        meta = f.metadata()
    weights = load_file(model)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01  # another model: same shapes, other weights
    other = tmp_path / "other.safetensors"
    save_file(weights, str(other), metadata=meta)
    out, _ = embedded
    before = sorted(os.listdir(out))
    r = run_embed("--model", other, "--data", corpus, "--output", out)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-3000:]
    assert "another model" in r.stderr
    assert sorted(os.listdir(out)) == before and table(out).num_rows == SAMPLES


def test_model_actors_leave_reading_and_decoding_a_cpu_on_a_small_embedded_ray():
    """Two actors of one CPU each on a 2-CPU embedded Ray left the read (0.25 CPU) and decode
    (0.5) tasks that feed them unscheduled for ever; the actors now share all but one CPU."""
    from mmtrain.inference.batch_embed import cpus_per_actor

    for workers, cpus in [(1, 1), (1, 2), (2, 2), (3, 2), (2, 4), (8, 4), (3, 16)]:
        share = cpus_per_actor(workers, cpus)
        assert 0 < share <= 1
        assert workers * share + 0.75 <= cpus or share == 0.1, (workers, cpus, share)
    assert cpus_per_actor(2, 2) == 0.5 and cpus_per_actor(2, 8) == 1.0


def test_embedded_rows_leaves_out_exactly_the_quarantined_samples(model, defects, defects_embedded):
    """`embedded_rows` (what evaluate embeds through): the same vectors as `embed` wrote, and the
    samples `embed` quarantined left out, nothing else."""
    from mmtrain.inference.batch_embed import embedded_rows
    from mmtrain.inference.loaded import load_model
    from pipelines.shards import expand_shards

    data_cfg = load_model(model).data_cfg
    ds = embedded_rows(model, expand_shards([str(defects[0])]), data_cfg, preprocessed=False, workers=2, batch_size=8)
    got = pa.concat_tables(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    ids = [f"{s}#{k}" for s, k in zip(got["source"].to_pylist(), got["key"].to_pylist())]
    want = table(defects_embedded).to_pylist()
    assert sorted(ids) == sorted(row["id"] for row in want) and len(ids) == len(set(ids))
    by_id = dict(zip(ids, got.to_pylist()))
    for row in want:
        for m in ("image", "text", "audio"):
            a, b = row[f"{m}_vector"], by_id[row["id"]][f"{m}_vector"]
            assert (a is None) == (b is None), (row["id"], m)
            if a is not None:
                np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), atol=1e-5)


def operators(ds) -> list[str]:
    """The names of a lazy dataset's logical operators, source first."""
    names, op = [], ds._logical_plan.dag
    while op is not None:
        names.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    return names[::-1]


@pytest.mark.parametrize("gpus", [0, 1])
def test_cpu_actors_decode_their_own_rows_and_gpu_actors_are_fed_by_decode_tasks(ray_cluster, corpus, gpus):
    """On CPUs no decode task stands between the reader and the model actors (a decoded sample
    would cross the object store to reach an actor on the same cores); with GPUs CPU tasks
    decode, so that the node's CPUs feed the GPU actors. Only the plan is built: no GPU needed."""
    from mmtrain.inference.batch_embed import embedded_or_quarantined, embedded_rows
    from pipelines.config import DataConfig
    from pipelines.shards import expand_shards

    shards = expand_shards([str(corpus)])
    for build in (embedded_rows, embedded_or_quarantined):
        ops = operators(build("unused.safetensors", shards, DataConfig(), preprocessed=False, gpus_per_worker=gpus))
        assert len(ops) == 3 - (not gpus) and ops[-1] == "MapBatches(EmbedActor)", ops
        assert any("decode_keeping_errors" in op for op in ops) == bool(gpus), ops
