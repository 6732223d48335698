"""Checkpoints at the DeepSpeed level: elastic resume (N ranks -> M ranks through DeepSpeed's
universal checkpoint) for ZeRO 1-3 with real DeepSpeed processes on gloo, and the
completeness check that keeps a half-written or damaged checkpoint from being loaded."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port
from mmtrain.checkpoint import ABANDONED, UNIVERSAL_TAG, CheckpointStore, checkpoint_name, fetch, step_of
from mmtrain.export import load_latest
from mmtrain.weights_only import load_weights_only

SCRIPT = ROOT / "tests" / "ds_elastic.py"


def ranks(world: int, *args) -> None:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


# stage 2 (the default) is resumed 2 -> 1 -> 2 workers end to end in test_fault_tolerance.py
@pytest.mark.parametrize("stage,before,after", [(1, 2, 1), (3, 1, 2)])
def test_elastic_resume_keeps_weights_and_optimizer_state(tmp_path, stage, before, after):
    ranks(before, "save", tmp_path, stage)
    # stage 1 also loads the weights alone, in the same processes (see below)
    ranks(after, "load", tmp_path, stage, "full,weights" if stage == 1 else "full")
    expected = json.load(open(tmp_path / "expected.json"))["loss"]
    full = json.load(open(tmp_path / "got_full.json"))
    assert full["universal"] and (tmp_path / "ckpt" / UNIVERSAL_TAG).is_dir()
    # the step after resuming at another world size is the step the original run took ...
    assert abs(full["loss"] - expected) <= 1e-4 * abs(expected), (full["loss"], expected)
    if stage == 1:
        # ... which it would not be with the weights alone (so the check above can fail)
        weights_only = json.load(open(tmp_path / "got_weights.json"))["loss"]
        assert abs(weights_only - expected) > 1e-3 * abs(expected), (weights_only, expected)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real 2-rank ZeRO-2 checkpoint in the layout a run's storage holds."""
    out = tmp_path_factory.mktemp("saved")
    ranks(2, "save", out, 2)
    return out / "ckpt"


def storage_with(tmp_path, saved, steps):
    storage = tmp_path / "train"
    for s in steps:
        shutil.copytree(saved, storage / f"checkpoint_{s:09d}")
    return storage


def test_a_complete_checkpoint_passes_the_check(saved):
    assert CheckpointStore.containing(str(saved)).problem(str(saved)) is None


def test_a_checkpoint_cut_short_falls_back_to_the_previous_one(tmp_path, saved):
    storage = storage_with(tmp_path, saved, [2, 4, 6])
    # 6: a rank's upload never finished (no done marker); 4: a file lost bytes afterwards
    os.remove(storage / "checkpoint_000000006" / "done" / "rank_00001")
    optim = next((storage / "checkpoint_000000004" / "ds").glob("*rank_1*optim_states.pt"))
    with open(optim, "r+b") as f:
        f.truncate(os.path.getsize(optim) // 2)
    said, store = [], CheckpointStore(str(storage))
    assert store.latest_complete(log=said.append) == str(storage / "checkpoint_000000002")
    assert "rank 1 of 2 did not finish its part" in said[0] and "checkpoint_000000006" in said[0]
    assert "checkpoint_000000004" in said[1] and "bytes" in said[1] and "falling back" in said[1]
    # Ray Train's registered latest is used when it is complete, skipped when it is not
    assert store.select(str(storage / "checkpoint_000000002"), log=said.append).endswith("_000000002")
    assert store.select(str(storage / "checkpoint_000000004"), log=said.append).endswith("_000000002")


def test_a_missing_file_or_state_is_named(tmp_path, saved):
    storage = storage_with(tmp_path, saved, [2])
    ckpt, store = storage / "checkpoint_000000002", CheckpointStore(str(storage))
    os.remove(next((ckpt / "position").glob("rank_*.json")))
    assert "is missing" in store.problem(str(ckpt))
    os.remove(ckpt / "train_state.json")
    assert "train_state.json" in store.problem(str(ckpt))


def test_abandoned_saves_are_emptied_and_their_names_not_reused(tmp_path, saved):
    storage = storage_with(tmp_path, saved, [2, 4, 6])
    shutil.copytree(saved, storage / "checkpoint_000000004_r1")  # an earlier fallback's save of 4
    said, store = [], CheckpointStore(str(storage))
    store.discard_newer(2, log=said.append)
    # the folders stay (Ray Train may still list them and delete them itself), emptied
    for name in ("checkpoint_000000004", "checkpoint_000000004_r1", "checkpoint_000000006"):
        assert os.listdir(storage / name) == [ABANDONED]
    assert len(said) == 3 and all("removing" in s for s in said)
    assert store.list() == [str(storage / "checkpoint_000000002")]
    assert store.latest_complete(log=said.append) == str(storage / "checkpoint_000000002")
    taken = set(store.folders())
    assert checkpoint_name(4, taken) == "checkpoint_000000004_r2"
    assert checkpoint_name(6, taken) == "checkpoint_000000006_r1"
    assert checkpoint_name(8, taken) == "checkpoint_000000008"
    assert step_of(str(storage / "checkpoint_000000004_r2")) == 4


def test_a_same_size_change_to_a_real_file_is_caught_before_it_is_unpickled(tmp_path, saved):
    storage = storage_with(tmp_path, saved, [2, 4])
    ckpt, store = storage / "checkpoint_000000004", CheckpointStore(str(storage))
    record = json.loads((ckpt / "done" / "rank_00000").read_text())
    assert record["format"] == 2 and all(len(v["sha256"]) == 64 for v in record["files"].values())
    assert json.loads((ckpt / "rng" / "rank_00001.json").read_text())["torch"]  # RNG states are JSON, not pickles
    model = ckpt / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    assert store.problem(str(ckpt)) is None  # sizes cannot tell
    for rank in (0, 1):  # both ranks load the model states
        assert fetch(store, str(ckpt), rank) == "ds/mp_rank_00_model_states.pt does not match the sha256 it was written with"
    assert fetch(store, str(storage / "checkpoint_000000002"), 1) is None
    said = []
    checkpoint, run, weights = load_latest(store, log=said.append)
    assert checkpoint == str(storage / "checkpoint_000000002") and weights and run["model"]
    assert len(said) == 1 and "checkpoint_000000004 is incomplete (ds/mp_rank_00_model_states.pt does not" in said[0]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


def test_deepspeed_files_load_weights_only_and_a_foreign_pickle_is_refused(tmp_path, saved):
    for f in sorted((saved / "ds").glob("*.pt")):
        assert load_weights_only(str(f), map_location="cpu")
    planted = tmp_path / "optim_states.pt"
    torch.save({"optimizer_state_dict": RunsCode()}, planted)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        load_weights_only(str(planted))
