"""One rank of a real DeepSpeed job (gloo on CPU), started by tests/test_checkpoint.py once per
rank with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set.

    save  OUT STAGE         train 2 steps, checkpoint into OUT/ckpt (our staged layout),
                            train step 3, write the caption loss after it to OUT/expected.json
    load  OUT STAGE MODES   for each MODE of MODES (comma-separated, in one process: each
                            start of a rank costs seconds of imports), restore OUT/ckpt at this
                            world size (universal if it changed) into a fresh model and engine,
                            train step 3 on the same global batch, write the loss to
                            OUT/got_<MODE>.json; MODE "full" restores everything, "weights"
                            only the consolidated weights with a fresh optimizer and schedule
                            (a negative control: its loss must differ)

The caption loss is a per-token mean over equally long rows, so its gradient averaged over
ranks is the same at any world size (the contrastive losses are per-rank batches and are not).
"""
import json
import os
import shutil
import sys

import deepspeed
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmtrain.checkpoint import (DS_TAG, UNIVERSAL_TAG, CheckpointStore, TrainState,  # noqa: E402
                                ensure_universal, staged_checkpoint)
from mmtrain.config import RunConfig  # noqa: E402
from mmtrain.data_position import DataPosition  # noqa: E402
from mmtrain.deepspeed_config import build_deepspeed_config  # noqa: E402
from mmtrain.probe import probe_batch  # noqa: E402
from mmtrain.model import build_model  # noqa: E402
from mmtrain.weights_only import use_weights_only_loads  # noqa: E402

GLOBAL_BATCH = 8


def main(phase: str, out: str, stage: int, modes: str = "full") -> None:
    dist.init_process_group("gloo")
    for mode in modes.split(","):
        run(phase, out, stage, mode)
    dist.destroy_process_group()


def run(phase: str, out: str, stage: int, mode: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = RunConfig(data_paths=("x",), run_dir=out).replace(
        model={"vocab_size": 260, "contrastive_weight": 0.0}, train={"zero_stage": stage, "batch_size": GLOBAL_BATCH // world, "lr": 1e-2,
                                          "warmup_steps": 0, "epochs": 1})
    ckpt = os.path.join(out, "ckpt")
    store = CheckpointStore(out)
    universal = phase == "load" and mode == "full" and store.needs_universal(ckpt, world)
    if universal and rank == 0:
        assert ensure_universal(store, ckpt) is None
    dist.barrier()
    ds_config = build_deepspeed_config(cfg, world, steps=10, on_gpu=False)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    model = build_model(cfg.model)
    if phase == "load" and mode == "weights":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=DS_TAG))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config,
                                      dist_init_required=False)
    full = probe_batch(cfg, GLOBAL_BATCH)
    per = GLOBAL_BATCH // world
    mine = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}

    def step() -> None:
        loss = engine(mine)["loss"]  # the caption loss alone: contrastive_weight is 0
        engine.backward(loss)
        engine.step()

    def loss_now() -> float:
        with torch.no_grad():
            value = torch.tensor([float(engine(mine)["loss_caption"])])
        dist.all_reduce(value)
        return value.item() / world

    if phase == "save":
        step()
        step()
        state = TrainState(step=2, world_size=world, zero_stage=stage)
        with staged_checkpoint(engine, state, DataPosition(), cfg.to_json(), rank, out) as d:
            dist.barrier()
            if rank == 0:
                os.makedirs(ckpt, exist_ok=True)
            dist.barrier()
            shutil.copytree(d, ckpt, dirs_exist_ok=True)  # what Ray Train's upload does: merge ranks
            dist.barrier()
        step()
        result = {"loss": loss_now()}
        name = "expected.json"
    else:
        if mode == "full":
            assert use_weights_only_loads(engine)  # as the training loop restores
            engine.load_checkpoint(ckpt, tag=UNIVERSAL_TAG if universal else DS_TAG)
        assert store.saved_state(ckpt).step == 2
        step()
        result = {"loss": loss_now(), "universal": universal}
        name = f"got_{mode}.json"
    if rank == 0:
        with open(os.path.join(out, name), "w") as f:
            json.dump(result, f)
    dist.barrier()
    engine.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
