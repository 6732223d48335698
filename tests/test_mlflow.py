"""MLflow tracking (train --mlflow, evaluate into the same run): real MLflow, on a real tracking
server on loopback (SQLite store, proxied artifacts) and on a folder store, with real training
on the session's Ray."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import cli, free_port
from mmtrain.config import RunConfig
from mmtrain.metrics import MetricsWriter, read_metric_lines
from mmtrain.mlflow_tracking import MlflowMetrics, client_for, read_record, tracked, tracking_uri
from pipelines.errors import UserError

# tests never phone home (MLflow's usage telemetry); set before the session's Ray starts, so its workers inherit it
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

TRAIN = ("--batch-size", 8, "--checkpoint-every", 2, "--set", "train.log_every=1")  # a metrics line every step


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port: SQLite backend, artifacts proxied to a folder.
    Yields (url, wait): it starts at once, and `wait()` returns when it answers, so its start
    (minutes on a busy machine: it imports a lot) overlaps with the session's Ray and data."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # its own group: uvicorn and job workers
    url = f"http://127.0.0.1:{port}"

    def wait():
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return url
            except OSError:
                pass
            assert time.monotonic() < deadline, "no answer: " + (folder / "server.log").read_text()[-3000:]
            time.sleep(0.5)

    try:
        yield url, wait
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server_run(mlflow_server, small_data, tmp_path_factory):
    """One epoch tracked on the server, then evaluated: (run dir, evaluate's results, server URL)."""
    url = mlflow_server[1]()
    folder = tmp_path_factory.mktemp("mlflow_run")
    run = folder / "run"
    cli("train", "--data", small_data, "--run-dir", run, "--epochs", 1, *TRAIN, "--mlflow", url)
    # --mlflow: the one the run records
    out = cli("evaluate", "--model", run, "--data", small_data, "--output", folder / "eval.json")
    assert "MLflow: evaluation logged to run" in out.stderr
    return run, json.load(open(folder / "eval.json")), url


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def jsonl_history(run, key: str) -> list[tuple[int, float]]:
    return sorted((line["step"], line[key]) for line in read_metric_lines(str(run)))


def same_history(logged, written) -> bool:
    """The same steps, and the same numbers (MLflow stores doubles, the JSON lines decimals)."""
    return ([s for s, _ in logged] == [s for s, _ in written]
            and [v for _, v in logged] == pytest.approx([v for _, v in written], abs=1e-9))


def test_a_server_run_has_the_params_every_log_step_and_the_artifacts(server_run, tmp_path):
    from mmtrain.export import load_exported

    run, _, mlflow_server = server_run
    record = read_record(str(run))
    assert record["tracking_uri"] == mlflow_server
    client = client_for(mlflow_server)
    tracked_run = client.get_run(record["run_id"])
    assert tracked_run.info.status == "FINISHED" and tracked_run.info.run_name == "run"
    params = tracked_run.data.params
    assert params["train.batch_size"] == "8" and params["train.log_every"] == "1" and params["scale.workers"] == "2"
    assert params["train.mlflow"] == mlflow_server and int(params["model.vocab_size"]) > 0
    assert json.loads(params["data_paths"]) == json.load(open(run / "run_config.json"))["data_paths"]

    lines = read_metric_lines(str(run))
    assert len(lines) >= 3  # one epoch of 48 samples, 2 workers x 8: at least 3 steps, each logged
    for key in ("loss", "samples_per_s", "lr", "epoch"):
        # rank 0 alone logs: one value per metrics.jsonl line, the same steps and numbers
        assert same_history(history(client, record["run_id"], key), jsonl_history(run, key)), key

    top = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"model", "training.png", "run_config.json"} <= top
    model = client.download_artifacts(record["run_id"], "model/model.safetensors", str(tmp_path))
    loaded, model_cfg, _ = load_exported(model)
    assert model_cfg.vocab_size == int(params["model.vocab_size"])
    png = client.download_artifacts(record["run_id"], "training.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluate_logs_into_the_same_run(server_run, tmp_path):
    run, result, mlflow_server = server_run
    run_id = read_record(str(run))["run_id"]
    client = client_for(mlflow_server)
    step = int(result["checkpoint"].split("_")[1])
    assert step == max(line["step"] for line in read_metric_lines(str(run)))
    for key in ("image_to_text/recall@1", "caption_loss", "samples"):
        assert history(client, run_id, "eval/" + key.replace("@", "_at_")) == [(step, pytest.approx(result[key]))]
    assert client.get_run(run_id).data.tags["eval.checkpoint"] == result["checkpoint"]
    logged = client.download_artifacts(run_id, "evaluation/eval.json", str(tmp_path))
    assert json.load(open(logged)) == result


@pytest.fixture(scope="module")
def folder_run(small_data, tmp_path_factory):
    """Two steps of one worker tracked in a folder store named by a relative path (the workers
    run elsewhere and must still find it): (the folder holding run/ and mlruns/, RUN/mlflow.json)."""
    folder = tmp_path_factory.mktemp("mlflow_folder")
    cli("train", "--data", small_data, "--run-dir", "run", "--max-steps", 2, "--workers", 1, *TRAIN,
        "--mlflow", "mlruns", cwd=folder)
    return folder, read_record(str(folder / "run"))


def test_a_folder_store_has_the_params_every_log_step_and_the_artifacts(folder_run):
    folder, record = folder_run
    run = folder / "run"
    assert record["tracking_uri"] == f"file://{folder}/mlruns"
    client = client_for(record["tracking_uri"])
    tracked_run = client.get_run(record["run_id"])
    assert tracked_run.info.status == "FINISHED"
    assert tracked_run.data.params["train.max_steps"] == "2" and tracked_run.data.params["scale.workers"] == "1"
    assert [line["step"] for line in read_metric_lines(str(run))] == [1, 2]
    assert same_history(history(client, record["run_id"], "loss"), jsonl_history(run, "loss"))
    assert {a.path for a in client.list_artifacts(record["run_id"])} >= {"model", "training.png", "run_config.json"}
    assert {a.path for a in client.list_artifacts(record["run_id"], "model")} == {"model/model.safetensors"}


def test_show_says_where_the_run_is_tracked(folder_run, capsys):
    import ray_job

    folder, record = folder_run
    assert ray_job.main(["show", str(folder / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mlflow"] == record
    assert ray_job.main(["show", str(folder / "run")]) == 0
    assert f"mlflow       run {record['run_id']} at {record['tracking_uri']}" in capsys.readouterr().out


def test_export_and_plot_on_their_own_log_into_the_run(folder_run, tmp_path, capsys):
    import ray_job

    folder, record = folder_run
    client = client_for(record["tracking_uri"])
    assert ray_job.main(["export", "--run-dir", str(folder / "run"), "--output", str(tmp_path / "again.safetensors")]) == 0
    assert ray_job.main(["plot", "--run-dir", str(folder / "run"), "--output", str(tmp_path / "again.png")]) == 0
    said = capsys.readouterr().err
    assert f"MLflow: model/again.safetensors logged to run {record['run_id']}" in said
    assert f"MLflow: again.png logged to run {record['run_id']}" in said
    assert "model/again.safetensors" in {a.path for a in client.list_artifacts(record["run_id"], "model")}
    for name, written in (("model/again.safetensors", "again.safetensors"), ("again.png", "again.png")):
        logged = client.download_artifacts(record["run_id"], name, str(tmp_path / "logged"))
        assert open(logged, "rb").read() == (tmp_path / written).read_bytes(), name
    # a run that records no MLflow run: the file is written, nothing is logged, nothing said
    untracked = tmp_path / "untracked"
    untracked.mkdir()
    shutil.copy(folder / "run" / "metrics.jsonl", untracked)
    assert ray_job.main(["plot", "--run-dir", str(untracked)]) == 0
    assert "MLflow" not in capsys.readouterr().err and (untracked / "training.png").exists()


def test_a_resumed_run_continues_its_mlflow_run(folder_run, tmp_path):
    """What `train` again on RUN does with MLflow, without training again: the driver continues
    the recorded run (no --mlflow needed), rank 0's writer keeps the parameters' first values and
    adds the new steps, and the run ends FINISHED, one run in the experiment."""
    folder, first = folder_run
    run = tmp_path / "run"
    shutil.copytree(folder / "run", run)
    cfg = RunConfig.from_dict({**json.load(open(run / "run_config.json")), "run_dir": str(run)})
    cfg = cfg.replace(train={"mlflow": None, "max_steps": 4})
    said = []
    with tracked(cfg, log=said.append) as used:
        assert used.train.mlflow == first["tracking_uri"]
        client = client_for(first["tracking_uri"])
        assert client.get_run(first["run_id"]).info.status == "RUNNING"
        tee = MlflowMetrics(MetricsWriter(str(run), enabled=True), client, first["run_id"], say=said.append)
        tee.log_params(used.to_public_dict())
        tee.log(3, {"loss": 2.5, "epoch": 0})
        tee.close()
    assert f"MLflow: continuing run {first['run_id']} at {first['tracking_uri']}" in said
    assert any(line.startswith("MLflow keeps the first value of") and "train.max_steps" in line for line in said)
    assert read_record(str(run)) == first
    assert [r.info.run_id for r in client.search_runs([first["experiment_id"]])] == [first["run_id"]]
    tracked_run = client.get_run(first["run_id"])
    assert tracked_run.info.status == "FINISHED" and tracked_run.data.params["train.max_steps"] == "2"
    assert history(client, first["run_id"], "loss")[-1] == (3, 2.5)


def test_a_tracking_server_that_is_down_costs_the_driver_one_warning(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = RunConfig.from_dict({"data_paths": ["shards"], "run_dir": str(tmp_path), "train": {"mlflow": down}})
    said = []
    with tracked(cfg, log=said.append) as used:
        assert used.train.mlflow is None  # the workers do not try
    assert len(said) == 1 and said[0].startswith(f"warning: MLflow at {down} failed") and "training goes on" in said[0]
    assert read_record(str(tmp_path)) is None


def test_a_tracking_server_lost_during_training_costs_rank_0_one_warning(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    said = []
    tee = MlflowMetrics(MetricsWriter(str(tmp_path), enabled=True), client_for(down), "0" * 32, say=said.append)
    for step in (1, 2, 3):
        tee.log(step, {"loss": 1.0 / step})
    tee.close()
    assert len(said) == 1 and said[0].startswith("warning: MLflow failed") and "training goes on" in said[0]
    assert [line["step"] for line in read_metric_lines(str(tmp_path))] == [1, 2, 3]  # metrics.jsonl has them all


def test_tracking_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking_uri("mlruns") == f"file://{tmp_path}/mlruns"
    assert tracking_uri("file:mlruns") == f"file://{tmp_path}/mlruns"
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(UserError, match="MLFLOW_TRACKING_PASSWORD"):
        tracking_uri("https://me:secret@mlflow.example.com")
