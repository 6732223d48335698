"""`serve`: a real Ray Serve HTTP endpoint on loopback, with the demo's trained model.

Serve starts once for the module on the session's Ray (the app with a small Lance embedding
table for /search) and is shut down at the end. Every endpoint's answer is checked against the
same call made in this process; a burst of bad requests gets 4xx JSON lines, and afterwards the
same replica still answers. The CLI is run as users run it (its own embedded Ray): it prints
the URL, serves, and stops cleanly on Ctrl-C."""
from __future__ import annotations

import base64
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import requests

from conftest import ROOT, free_port

CAP = 2 * 1024 * 1024  # the module app's body cap: small, so that the over-cap requests stay cheap
SUBJECTS = 16
TIMEOUT = 120


@dataclass
class Sample:
    key: str
    subject: int
    caption: str
    image: bytes
    audio: bytes


def corpus_samples(n: int, seed: int) -> list[Sample]:
    """`n` samples of the synthetic corpus (one per subject in turn) with all three modalities."""
    from pipelines.corpus_samples import GOOD, plan, render

    out, i = [], 0
    while len(out) < n:
        p = plan(seed, GOOD, i, SUBJECTS)
        i += 1
        if None in (p.image, p.text, p.audio):
            continue
        members = {name.rsplit(".", 1)[-1].lower(): data for name, data, _ in render(p)}
        image = next(members[e] for e in ("jpg", "png", "webp") if e in members)
        audio = next(members[e] for e in ("wav", "flac", "ogg", "mp3") if e in members)
        out.append(Sample(p.key, p.subject, p.text[1], image, audio))
    return out


def write_index(out, loaded, samples: list[Sample]) -> None:
    """An `embed` output made in this process: the samples' vectors in the Lance table schema."""
    import lance
    import pyarrow as pa

    from mmtrain.inference.batch_embed import vectors_table
    from mmtrain.inference.inputs import embed_rows, rows_from_items
    from mmtrain.inference.schema import TABLE_DIR, embedding_schema, sample_id

    rows = rows_from_items([{"image": s.image, "text": s.caption, "audio": s.audio} for s in samples], loaded)
    rows["key"] = np.array([s.key for s in samples], dtype=object)
    rows["source"] = np.array(["mem://test-corpus.tar"] * len(samples), dtype=object)
    table = vectors_table(rows, embed_rows(rows, loaded), loaded.embed_dim)
    ids = [sample_id(s, k) for s, k in zip(rows["source"], rows["key"])]
    table = table.append_column("id", pa.array(ids)).append_column("shard", table.column("source"))
    schema = embedding_schema(loaded.embed_dim)
    lance.write_dataset(table.select(schema.names).cast(schema), os.path.join(out, TABLE_DIR))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def small_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (220, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(ray_cluster, demo_workdir, tmp_path_factory):
    from ray import serve

    from mmtrain.inference.loaded import load_model
    from mmtrain.inference.serve import ServeConfig, start_app

    model = str(demo_workdir[0] / "model.safetensors")
    loaded = load_model(model)
    samples = corpus_samples(SUBJECTS, seed=2024)
    index = str(tmp_path_factory.mktemp("serve_index"))
    write_index(index, loaded, samples)
    # the queries: samples whose image and audio travel well under the cap
    queries = [s for s in corpus_samples(48, seed=2025) if len(s.image) + len(s.audio) < CAP // 2][:4]
    assert queries, "no corpus sample small enough to send"
    try:
        url = start_app(ServeConfig(model=model, index=index, port=free_port(), max_body_bytes=CAP))
        yield SimpleNamespace(url=url, loaded=loaded, index=index, samples=samples, queries=queries)
    finally:
        serve.shutdown()


def post(served, path: str, body) -> requests.Response:
    data = body if isinstance(body, bytes) else None
    return requests.post(served.url + path, data=data, json=None if data is not None else body, timeout=TIMEOUT)


def ok_json(r: requests.Response):
    assert r.status_code == 200, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def test_healthz_names_the_model_and_the_index(served):
    h = ok_json(requests.get(served.url + "/healthz", timeout=TIMEOUT))
    assert h["status"] == "ok"
    assert h["model"] == served.loaded.origin
    assert h["embed_dim"] == served.loaded.embed_dim
    assert h["rows"] == len(served.samples) and h["index"] == served.index


def test_embed_text_equals_the_in_process_embedding(served):
    from mmtrain.inference.inputs import embed_items

    text = "a red circle on a plain background"
    got = ok_json(post(served, "/embed", {"text": text}))
    assert list(got) == ["text"] and len(got["text"]) == served.loaded.embed_dim
    want = embed_items([{"text": text}], served.loaded)["text"][0]
    np.testing.assert_allclose(np.array(got["text"]), want, atol=1e-5)
    assert abs(np.linalg.norm(got["text"]) - 1) < 1e-4


def test_embed_image_and_audio_together(served):
    from mmtrain.inference.inputs import embed_items

    q = served.queries[0]
    got = ok_json(post(served, "/embed", {"image": b64(q.image), "audio": b64(q.audio)}))
    assert sorted(got) == ["audio", "image"]
    want = embed_items([{"image": q.image, "audio": q.audio}], served.loaded)
    for m in ("image", "audio"):
        np.testing.assert_allclose(np.array(got[m]), want[m][0], atol=1e-5)


def test_search_answers_the_search_objects_best_first(served):
    from mmtrain.inference.search import open_index, query_vector

    text = served.samples[0].caption
    got = ok_json(post(served, "/search", {"text": text, "k": 3}))
    assert len(got) == 3
    assert all({"key", "source", "score", "caption"} <= set(r) for r in got)
    scores = [r["score"] for r in got]
    assert scores == sorted(scores, reverse=True)
    vector, _ = query_vector(served.loaded, {"text": text})
    want = open_index(served.index).search(vector, "image", 3)  # a caption searches images by default
    assert [r["key"] for r in got] == [r["key"] for r in want]
    np.testing.assert_allclose(scores, [r["score"] for r in want], atol=1e-5)

    assert len(ok_json(post(served, "/search", {"text": text}))) == 5  # k defaults to 5
    by_image = ok_json(post(served, "/search", {"image": b64(served.queries[0].image), "target": "image", "k": 2}))
    assert len(by_image) == 2 and by_image[0]["key"] in {s.key for s in served.samples}


def test_classify_answers_label_score_and_scores(served):
    from pipelines.corpus_samples import subject_names

    from mmtrain.inference.classify import label_embeddings, logit_scale, zero_shot
    from mmtrain.inference.inputs import embed_items

    labels = subject_names(SUBJECTS)
    q = served.queries[1 % len(served.queries)]
    got = ok_json(post(served, "/classify", {"image": b64(q.image), "labels": labels, "template": "a photo of {}"}))
    assert set(got) == {"label", "score", "scores"} and got["label"] in labels
    assert list(got["scores"]) == labels and abs(sum(got["scores"].values()) - 1) < 1e-4
    assert got["score"] == max(got["scores"].values()) == got["scores"][got["label"]]
    best, scores = zero_shot(embed_items([{"image": q.image}], served.loaded)["image"],
                             label_embeddings(served.loaded, labels, "a photo of {}"), logit_scale(served.loaded))
    assert got["label"] == labels[int(best[0])]
    np.testing.assert_allclose(list(got["scores"].values()), scores[0], atol=1e-5)


def test_caption_equals_the_in_process_caption(served):
    from mmtrain.inference.caption import caption_rows
    from mmtrain.inference.inputs import rows_from_items

    q = served.queries[0]
    got = ok_json(post(served, "/caption", {"image": b64(q.image), "audio": b64(q.audio), "max_len": 24}))
    assert list(got) == ["caption"] and isinstance(got["caption"], str)
    rows = rows_from_items([{"image": q.image, "audio": q.audio}], served.loaded)
    assert got["caption"] == caption_rows(served.loaded, rows, max_len=24, beams=1)[0]
    beam = ok_json(post(served, "/caption", {"image": b64(q.image), "beams": 3}))
    assert isinstance(beam["caption"], str)


def bad_requests() -> list[tuple[str, str, object, int, str]]:
    """(method, path, body: bytes, a JSON value, or an iterator of chunks, status, words of the error)"""
    img, text = b64(small_png()), "a red circle"
    two = ["a red circle", "a blue square"]
    return [
        ("POST", "/embed", b"not json{", 400, "not json"),
        ("POST", "/embed", b"", 400, "empty body"),
        ("POST", "/embed", b"[1, 2]", 400, "json object"),
        ("POST", "/embed", b"\xff\xfe{\x00", 400, "not json"),
        ("POST", "/embed", b"[" * 200_000, 400, "nested too deeply"),
        ("POST", "/embed", {"text": text, "colour": "red"}, 400, 'unknown field(s) "colour"'),
        ("POST", "/embed", {"text": text, "x" * 5000: 1}, 400, "unknown field"),
        ("POST", "/embed", {}, 400, "no input"),
        ("POST", "/embed", {"text": "   "}, 400, "text"),
        ("POST", "/embed", {"text": 42}, 400, "text must be a string"),
        ("POST", "/embed", {"image": "%%% not base64 %%%"}, 400, "not valid base64"),
        ("POST", "/embed", {"image": "ÿÿÿÿ"}, 400, "not valid base64"),
        ("POST", "/embed", {"image": 123}, 400, "base64 string"),
        ("POST", "/embed", {"image": ""}, 400, "non-empty"),
        ("POST", "/embed", {"image": b64(b"plain text, not a picture at all")}, 400, "input 0"),
        ("POST", "/embed", {"audio": img}, 400, "input 0"),
        ("POST", "/embed", b" " * (CAP + 1), 413, f"cap of {CAP:,} bytes"),
        ("POST", "/embed", iter([b" " * 65536] * (CAP // 65536 + 1)), 413, f"cap of {CAP:,} bytes"),  # chunked
        ("POST", "/search", {"text": text, "image": img}, 400, "one input"),
        ("POST", "/search", {"text": text, "k": 0}, 400, "k must be an integer from 1 to 100"),
        ("POST", "/search", {"text": text, "k": 101}, 400, "k must be"),
        ("POST", "/search", {"text": text, "k": "5"}, 400, "k must be"),
        ("POST", "/search", {"text": text, "k": True}, 400, "k must be"),
        ("POST", "/search", {"text": text, "target": "video"}, 400, "target must be"),
        # nested just under the parser's depth limit: echoing it back must not recurse past it
        ("POST", "/search", b'{"text": "x", "k": ' + b"[" * 900 + b"]" * 900 + b"}", 400, "k must be"),
        # a lone surrogate parses, but an answer echoing it could not be encoded
        ("POST", "/classify", json.dumps({"image": img, "labels": ["\ud800", "a blue square"]}).encode(), 400,
         "valid unicode"),
        ("POST", "/classify", {"text": text}, 400, "labels"),
        ("POST", "/classify", {"image": img, "labels": "red,blue"}, 400, "labels must be a list"),
        ("POST", "/classify", {"image": img, "labels": ["a red circle", ""]}, 400, "non-empty"),
        ("POST", "/classify", {"image": img, "labels": ["a red circle"] * 2}, 400, "distinct"),
        ("POST", "/classify", {"image": img, "labels": two, "template": "{0.__class__}"}, 400, "template"),
        ("POST", "/classify", {"image": img, "labels": two, "template": "no slot"}, 400, "template"),
        ("POST", "/caption", {"text": text}, 400, "not text"),
        ("POST", "/caption", {"image": img, "beams": 99}, 400, "beams must be"),
        ("POST", "/caption", {"image": img, "max_len": 0}, 400, "max_len must be"),
        ("POST", "/nope", {"text": text}, 404, "no such endpoint: post /nope"),
        ("GET", "/embed", None, 405, "method not allowed"),
    ]


def test_bad_requests_get_4xx_json_and_the_replica_lives_on(served):
    before = ok_json(requests.get(served.url + "/healthz", timeout=TIMEOUT))["replica"]
    wrong = []
    for method, path, body, status, words in bad_requests():
        kw = {"json": body} if isinstance(body, (dict, list)) else {"data": body}
        r = requests.request(method, served.url + path, timeout=TIMEOUT, **kw)
        try:
            doc = r.json()
        except ValueError:
            doc = None
        if not (r.status_code == status and isinstance(doc, dict) and list(doc) == ["error"]
                and "\n" not in doc["error"] and len(doc["error"]) <= 300 and words.lower() in doc["error"].lower()):
            wrong.append(f"{method} {path} {str(body)[:60]!r}: {r.status_code} {r.text[:200]!r}")
    assert not wrong, "\n".join(wrong)
    # the same replica (one in this app) still answers, and is the one that took the burst
    assert ok_json(requests.get(served.url + "/healthz", timeout=TIMEOUT))["replica"] == before
    assert len(ok_json(post(served, "/embed", {"text": "a blue square"}))["text"]) == served.loaded.embed_dim


def test_exposure_warning_only_beyond_loopback():
    from mmtrain.inference.serve import exposure_warning

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host) is None, host
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        line = exposure_warning(host)
        assert line and "no authentication" in line and "\n" not in line, host


def test_cli_refuses_a_missing_model_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "serve", "--model", str(tmp_path / "none.safetensors"),
                        "--host", "0.0.0.0"], capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert "no authentication" in lines[0] and lines[-1].startswith("error: --model"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_cli_refuses_gpus_its_embedded_ray_lacks_in_one_line(demo_workdir):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "serve", "--model",
                        str(demo_workdir[0] / "model.safetensors"), "--replicas", "2", "--gpus-per-replica", "64",
                        "--port", str(free_port())], capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --replicas 2 x --gpus-per-replica 64") and "needs 128 GPUs" in last, last
    assert "Traceback" not in r.stderr


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)


def test_cli_serves_until_ctrl_c_and_stops_cleanly(demo_workdir):
    # relative: the replicas run in Ray's worker folders, and must still find it
    model = os.path.relpath(demo_workdir[0] / "model.safetensors", ROOT)
    port = free_port()
    # more replicas than this machine has CPUs: they share an embedded Ray's CPUs instead of waiting for ever
    replicas = (os.cpu_count() or 1) + 1
    # its own embedded Ray, as a user runs it: not the session's cluster
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "ray_job.py"), "serve", "--model", model, "--port", str(port),
                             "--replicas", str(replicas)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    out: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True)
    reader.start()
    try:
        deadline, line = time.time() + 300, ""
        while "serving" not in line:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                line = out.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                pytest.fail("serve printed no URL in 300 s")
        url = f"http://127.0.0.1:{port}"
        assert url in line
        assert ok_json(requests.get(url + "/healthz", timeout=TIMEOUT))["rows"] is None
        r = requests.post(url + "/search", json={"text": "a red circle"}, timeout=TIMEOUT)
        assert r.status_code == 400 and "no index" in r.json()["error"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 0, proc.stderr.read()[-3000:]
        reader.join(timeout=30)
        rest = []
        while not out.empty():
            rest.append(out.get())
        assert "stopped" in "".join(rest)
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/healthz", timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
