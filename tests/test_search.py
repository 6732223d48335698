"""`search`: cross-modal nearest neighbours over a real Lance embedding table, embedded with the
demo's trained model, through the library (`open_index`, `query_vector`, `ensure_index`) and
the command line (`ray_job.py search`).

The table is built here the way `embed` builds it (its rows are `batch_embed.vectors_table`'s,
in `schema.embedding_schema`), but in-process with `embed_rows` on a fresh corpus the model
never saw: no Ray needed, and the test does not depend on the embed job's code.
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import ROOT

SUBJECTS = 16
TABLE_SAMPLES = 12 * SUBJECTS  # sample i is of subject i % 16 (pipelines.corpus_samples.plan)


def subject_of(key: str) -> int:
    return int(key[-7:]) % SUBJECTS


def corpus_items(shards: list[Path]) -> tuple[list[dict], list[str], list[str]]:
    """The samples of raw shards as query items ({"image": bytes, "text": str, "audio": bytes}),
    with their keys and sources: the members as a user would hand them over."""
    items, keys, sources = [], [], []
    for shard in shards:
        samples: dict[str, dict] = defaultdict(dict)
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                if ext in ("txt", "txt.gz", "json"):
                    data = gzip.decompress(data) if ext == "txt.gz" else data
                    data = json.loads(data)["caption"] if ext == "json" else data.decode("utf-8")
                    samples[key]["text"] = data.strip()
                else:
                    samples[key]["image" if ext.lower() in ("jpg", "jpeg", "png", "webp") else "audio"] = data
        for key, item in samples.items():
            items.append(item), keys.append(key), sources.append(str(shard))
    return items, keys, sources


def embedding_table(items, keys, sources, loaded) -> pa.Table:
    """What `embed` writes for these samples: `vectors_table`'s rows plus id and shard."""
    from mmtrain.inference.batch_embed import vectors_table
    from mmtrain.inference.inputs import embed_rows, rows_from_items
    from mmtrain.inference.schema import embedding_schema, sample_id

    rows = rows_from_items(items, loaded)
    rows["key"], rows["source"] = np.array(keys, dtype=object), np.array(sources, dtype=object)
    t = vectors_table(rows, embed_rows(rows, loaded), loaded.embed_dim)
    t = t.append_column("id", pa.array([sample_id(s, k) for s, k in zip(sources, keys)]))
    t = t.append_column("shard", pa.array(sources))
    schema = embedding_schema(loaded.embed_dim)
    return t.select(schema.names).cast(schema)


def write_out(out: Path, table: pa.Table, model: str, fingerprint: str | None = None) -> Path:
    """An `embed` output folder: OUT/embeddings.lance (written by pylance, as Ray Data's Lance
    writer does) and OUT/embed.json naming the model (and its fingerprint, as `embed` does)."""
    import lance

    out.mkdir(parents=True)
    lance.write_dataset(table, str(out / "embeddings.lance"))
    recorded = {"path": model, **({"fingerprint": fingerprint, "origin": model} if fingerprint else {})}
    (out / "embed.json").write_text(json.dumps({"model": recorded}))  # as `embed` writes it
    return out


def retrained_copy(model: str, path: Path) -> Path:
    """The export with one weight changed: same config and dimension, another model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(model, framework="pt") as f:
        meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, str(path), metadata=meta)
    return path


@pytest.fixture(scope="module")
def built(demo_workdir, tmp_path_factory):
    """(OUT, the loaded model, the query items: 16 held-out samples, one per subject)."""
    from mmtrain.inference.loaded import load_model, model_fingerprint
    from pipelines.corpus import make_corpus

    work, _ = demo_workdir
    model = str(work / "model.safetensors")
    loaded = load_model(model)
    tmp = tmp_path_factory.mktemp("search")
    make_corpus(str(tmp / "raw"), TABLE_SAMPLES, 2, seed=14014)
    make_corpus(str(tmp / "queries"), SUBJECTS, 1, seed=14015)
    items, keys, sources = corpus_items(sorted((tmp / "raw").glob("shard-*.tar")))
    table = embedding_table(items, keys, sources, loaded)
    out = write_out(tmp / "out", table, model, model_fingerprint(loaded))
    queries, qkeys, _ = corpus_items(sorted((tmp / "queries").glob("shard-*.tar")))
    by_subject = {subject_of(k): q for k, q in zip(qkeys, queries)}
    return out, loaded, table, by_subject


def subject_names() -> list[str]:
    from pipelines.corpus_samples import subject_names as names

    return names(SUBJECTS)


def subject_queries() -> list[str]:
    """A query naming each subject, phrased as people search (and as classify's default
    template): the model learned from captions, and a bare "a red circle" is not one (on the
    demo model bare names find their subject for 10 of 16 subjects, these for 16 of 16)."""
    return [f"a photo of {name}" for name in subject_names()]


def test_a_text_query_naming_a_subject_finds_its_images(built):
    from mmtrain.inference.search import open_index, query_vector

    out, loaded, table, _ = built
    index = open_index(str(out))
    assert (index.count, index.dim) == (TABLE_SAMPLES, loaded.embed_dim)
    hits, first = [], []
    for s, query in enumerate(subject_queries()):
        vector, modality = query_vector(loaded, {"text": query})
        assert modality == "text" and vector.shape == (index.dim,)
        found = index.search(vector, "image", 5)
        assert len(found) == 5 and [r["score"] for r in found] == sorted((r["score"] for r in found), reverse=True)
        hits.append(sum(subject_of(r["key"]) == s for r in found))
        first.append(subject_of(found[0]["key"]) == s)
    # the issue asks for the subject's images in the top 5 for >= 80% of subjects; asked here:
    # a majority of the top 5, and the best hit, for >= 80% of subjects (the demo model: all 16)
    assert sum(h >= 3 for h in hits) >= 0.8 * SUBJECTS, hits
    assert sum(first) >= 0.8 * SUBJECTS, first


def test_scores_are_the_cosine_similarities_and_null_vectors_are_never_returned(built):
    from mmtrain.inference.search import open_index, query_vector

    out, loaded, table, _ = built
    vectors = {r["id"]: r["image_vector"] for r in table.to_pylist()}
    without_image = {i for i, v in vectors.items() if v is None}
    index = open_index(str(out))
    q, _ = query_vector(loaded, {"text": subject_queries()[0]})
    everything = index.search(q, "image", TABLE_SAMPLES)
    assert len(everything) == TABLE_SAMPLES - len(without_image)
    assert not {r["id"] for r in everything} & without_image
    for r in everything[:10]:
        assert r["score"] == pytest.approx(float(np.dot(q, vectors[r["id"]])), abs=1e-4)


def test_image_finds_captions_and_audio_finds_images(built):
    from mmtrain.inference.search import open_index, query_vector

    out, loaded, _, by_subject = built
    index = open_index(str(out))
    names = subject_names()
    images = {s: item["image"] for s, item in by_subject.items() if "image" in item}
    audios = {s: item["audio"] for s, item in by_subject.items() if "audio" in item}
    assert len(images) >= 12 and len(audios) >= 12
    image_right = audio_right = 0
    for s, data in images.items():
        vector, modality = query_vector(loaded, {"image": data})
        found = index.search(vector, "text", 5)
        assert modality == "image" and all(r["caption"] for r in found)
        # the best caption is one of this subject's (5% of captions are in Chinese: check by key)
        image_right += subject_of(found[0]["key"]) == s
        english = [r["caption"] for r in found if r["caption"].isascii() and subject_of(r["key"]) == s]
        assert all(names[s] in c.lower() for c in english), english
    for s, data in audios.items():
        vector, modality = query_vector(loaded, {"audio": data})
        assert modality == "audio"
        audio_right += any(subject_of(r["key"]) == s for r in index.search(vector, "image", 5))
    assert image_right >= 0.8 * len(images), image_right
    assert audio_right >= 0.8 * len(audios), audio_right


def padded(table: pa.Table, rows: int, seed: int = 0) -> pa.Table:
    """`table` plus random unit vectors up to `rows` rows (5% of each column null): a table big
    enough to get an ANN index, whose real rows are the ones the queries should find."""
    from mmtrain.inference.schema import MODALITIES, VECTOR_COLUMNS

    rng = np.random.default_rng(seed)
    n, dim = rows - table.num_rows, table.schema.field("image_vector").type.list_size
    ids = [f"pad#{i}" for i in range(n)]
    cols = {"id": ids, "source": ["pad"] * n, "key": [f"pad{i:06d}" for i in range(n)], "shard": ["pad"] * n,
            "caption": [None] * n}
    for m in MODALITIES:
        v = rng.standard_normal((n, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        cols[VECTOR_COLUMNS[m]] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim,
                                                                    mask=pa.array(rng.random(n) < 0.05))
    return pa.concat_tables([table, pa.table(cols, schema=table.schema)])


def test_ann_index_is_built_when_large_and_finds_what_exact_search_finds(built, tmp_path):
    from mmtrain.inference.search import open_index, query_vector
    from mmtrain.inference.vector_index import ensure_index

    out, loaded, table, by_subject = built
    small = ensure_index(str(out))  # 192 rows: far below the threshold, exact search
    assert all(not c["built"] and c["index"] is None and "exact" in c["why"] for c in small.values()), small
    assert open_index(str(out)).indexed == set()

    big = write_out(tmp_path / "big", padded(table, 3000), json.loads((out / "embed.json").read_text())["model"]["path"])
    report = ensure_index(str(big), min_rows=2000)
    assert {c: (r["built"], r["index"]) for c, r in report.items()} == \
        {c: (True, "IVF_PQ") for c in ("image_vector", "text_vector", "audio_vector")}, report
    assert report["image_vector"]["vectors"] > 2000
    again = ensure_index(str(big), min_rows=2000)
    assert not any(r["built"] for r in again.values()) and all(r["index"] for r in again.values()), again

    index = open_index(str(big))
    assert index.indexed == {"image_vector", "text_vector", "audio_vector"} and index.count == 3000
    queries = [({"text": query}, "image") for query in subject_queries()]
    queries += [({"image": q["image"]}, "text") for q in by_subject.values() if "image" in q]
    queries += [({"audio": q["audio"]}, "image") for q in by_subject.values() if "audio" in q]
    for item, target in queries:
        vector, _ = query_vector(loaded, item)
        ann, exact = index.search(vector, target, 5), index.search(vector, target, 5, exact=True)
        # the refine step re-ranks by exact vectors: same rows, same scores (ties may swap places)
        assert {r["id"] for r in ann} == {r["id"] for r in exact}, (item.keys(), target)
        assert [r["score"] for r in ann] == pytest.approx([r["score"] for r in exact], abs=1e-5)
        assert not any(r["id"].startswith("pad#") for r in ann)


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "search", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_json_and_table(built, capsys):
    import ray_job

    out, _, _, _ = built
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "search", "--index", str(out),
                        "--text", subject_queries()[3], "-k", "4", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout)
    assert isinstance(found, list) and len(found) == 4
    for row in found:
        assert {"key", "source", "score", "caption", "id"} <= set(row)
        assert isinstance(row["score"], float) and -1.0001 <= row["score"] <= 1.0001
        assert row["source"].endswith(".tar") and row["id"] == f"{row['source']}#{row['key']}"
    assert sum(subject_of(row["key"]) == 3 for row in found) >= 3, found

    # the readable table, default k = 5, and the default target for a text query (image)
    assert ray_job.main(["search", "--index", str(out), "--text", subject_queries()[3]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["#", "score", "key"] and len(lines) == 6, lines
    assert [line.split()[2] for line in lines[1:5]] == [row["key"] for row in found]


def narrow_table(table: pa.Table, dim: int) -> pa.Table:
    """The first rows of `table` with `dim`-dimensional vectors: a table another model made."""
    from mmtrain.inference.schema import embedding_schema

    head = table.slice(0, 4)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.full(4 * dim, dim ** -0.5, np.float32)), dim)
    cols = {c: head[c] for c in ("id", "source", "key", "shard", "caption")}
    cols.update({c: vec for c in ("image_vector", "text_vector", "audio_vector")})
    return pa.table(cols).cast(embedding_schema(dim))


def test_bad_input_is_one_line_and_exit_2(built, tmp_path, capsys):
    import ray_job

    out, loaded, table, _ = built
    model = json.loads((out / "embed.json").read_text())["model"]["path"]
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_bytes(b"these are not pixels\n" * 20)
    narrow = write_out(tmp_path / "narrow", narrow_table(table, 8), model)
    unnamed = write_out(tmp_path / "unnamed", table.slice(0, 4), model)
    (unnamed / "embed.json").unlink()
    text = ["--text", "a photo of a red circle"]
    cases = [
        ("no embedding table", ["--index", tmp_path / "nowhere", *text]),
        ("image_decode_error", ["--index", out, "--image", not_an_image]),
        ("no such file", ["--index", out, "--image", tmp_path / "absent.png"]),
        ("non-empty string", ["--index", out, "--text", "  "]),
        ("-k must be at least 1", ["--index", out, *text, "-k", "0"]),
        (f"makes {loaded.embed_dim}-dimensional vectors but", ["--index", narrow, *text]),
        ("pass --model", ["--index", unnamed, *text]),
        ("no such file", ["--index", out, *text, "--model", tmp_path / "absent.safetensors"]),
        # the same dimension, another model: vectors in another space are refused, not searched
        ("is not the one that built", ["--index", out, *text, "--model",
                                       retrained_copy(model, tmp_path / "retrained.safetensors")]),
    ]
    for expected, args in cases:
        assert ray_job.main(["search", *map(str, args)]) == 2, expected
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("error: ") and "Traceback" not in err, err
        assert expected.lower() in err.lower(), (expected, err)
    assert not (tmp_path / "nowhere").exists()  # nothing is created where the index was not


def test_search_on_object_storage(built, s3_server, s3_bucket):
    """OUT in a bucket (S3 on loopback), reached with the fsspec `--storage-options` every other
    command takes: the same answers as on local disk."""
    import lance

    from mmtrain.inference.lance_store import lance_storage_options
    from mmtrain.inference.search import open_index, search_corpus
    from mmtrain.inference.vector_index import ensure_index

    out, _, table, _ = built
    bucket, fs = s3_bucket
    opts = s3_server["storage_options"]
    remote = f"s3://{bucket}/vectors"
    lance.write_dataset(table, f"{remote}/embeddings.lance", storage_options=lance_storage_options(opts))
    fs.pipe(f"{bucket}/vectors/embed.json", (out / "embed.json").read_bytes())
    assert open_index(remote, opts).count == TABLE_SAMPLES
    query = {"text": subject_queries()[5]}
    assert search_corpus(remote, query, storage_options=opts) == search_corpus(str(out), query)
    # the model in the bucket too (an export: its bytes read through fsspec)
    fs.pipe(f"{bucket}/models/model.safetensors", Path(json.loads((out / "embed.json").read_text())["model"]["path"])
            .read_bytes())
    assert search_corpus(remote, query, model=f"s3://{bucket}/models/model.safetensors",
                         storage_options=opts) == search_corpus(str(out), query)
    assert all(r["index"] is None for r in ensure_index(remote, opts).values())
