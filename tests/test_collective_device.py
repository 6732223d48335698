"""Collectives on tensors an NCCL group takes, checked on CPU (train.check_collectives).

On GPU Ray Train's process group is NCCL-only: a collective on a tensor made on the host is
refused at the first step. On CPU the guard (mmtrain/collective_guard.py) refuses the same
tensors. The first test runs the training loop's collectives as they were before they moved to
the training device (commit bdbc02f, quoted below) and as they are now, on 2 real gloo ranks;
the second is a real 2-worker training run with the guard on, DeepSpeed's collectives included.
"""
import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import cli
from mmtrain.collective_guard import CollectiveGuard
from mmtrain.device import any_rank, broadcast_int, sum_over_ranks
from mmtrain.metrics import read_metric_lines


# --- the loop's collectives at bdbc02f, verbatim but for their surroundings --------------------
def _lockstep_flag_bdbc02f(batch):  # mmtrain/loop.py lockstep
    flag = torch.tensor([0 if batch is None else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item()


def _metrics_sums_bdbc02f(sums: list):  # mmtrain/metrics_window.py MetricsWindow.report
    vec = torch.tensor([*sums, 1, 8, 100, 0.1, 2.0], dtype=torch.float64)
    dist.all_reduce(vec)
    return vec


def _attempt_bdbc02f(rank: int):  # mmtrain/attempts.py attempt_number
    n = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        n[0] = 3
    dist.broadcast(n, src=0)
    return int(n.item())


def _refused(fn, *args) -> str:
    try:
        fn(*args)
    except RuntimeError as e:
        return str(e)
    return "accepted"


def _rank(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    out = {}
    with CollectiveGuard(cpu):
        out["lockstep"] = _refused(_lockstep_flag_bdbc02f, object())
        out["metrics"] = _refused(_metrics_sums_bdbc02f, [0.5] * 5)
        out["attempt"] = _refused(_attempt_bdbc02f, rank)
        # computed only from a host-made tensor: still on the host on GPU
        out["derived"] = _refused(lambda: dist.all_reduce(torch.ones(2).to(torch.float64) * 2))
        # moved explicitly, or made on the device: what an NCCL group takes
        moved = torch.tensor([rank + 1.0]).to(cpu)
        dist.all_reduce(moved)
        gathered = [torch.zeros(1, device=cpu) for _ in range(world)]
        dist.all_gather(gathered, torch.tensor([float(rank)], device=cpu))
        # the loop's collectives now (mmtrain/device.py)
        out["now"] = [any_rank(rank == 1, cpu), any_rank(False, cpu), sum_over_ranks([1.0, rank], cpu).tolist(),
                      broadcast_int(7 if rank == 0 else 0, cpu), moved.item(), [g.item() for g in gathered]]
        # object collectives place their own tensors (torch picks the group's device)
        objects = [{"rank": rank}]
        dist.broadcast_object_list(objects, src=1)
        out["object"] = objects[0]
    dist.destroy_process_group()
    with open(f"{folder}/rank_{rank}.json", "w") as f:
        json.dump(out, f)


def test_guard_refuses_host_tensors_in_collectives_on_gloo_ranks(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = json.load(open(tmp_path / f"rank_{rank}.json"))
        for name, collective in (("lockstep", "all_reduce"), ("metrics", "all_reduce"), ("attempt", "broadcast")):
            assert out[name].startswith(f"collective {collective} at ") and __file__ in out[name], out[name]
            assert "a tensor on cpu created without a device at" in out[name]
            assert "NCCL accepts only tensors on the training device" in out[name]
        assert "created without a device" in out["derived"]
        assert out["now"] == [True, False, [2.0, 1.0], 7, 3.0, [0.0, 1.0]]
        assert out["object"] == {"rank": 1}


def test_training_run_with_checked_collectives(small_data, tmp_path):
    """Every collective of a real 2-worker run (lockstep, metrics, attempt number, DeepSpeed's
    ZeRO-2 reductions, the contrastive gather, checkpoint and resume agreement) passes the guard."""
    run = tmp_path / "run"
    out = cli("train", "--data", small_data, "--run-dir", run, "--max-steps", 3, "--batch-size", 8,
              "--checkpoint-every", 2, "--set", "train.check_collectives=true", "--set", "train.log_every=1")
    assert [m["step"] for m in read_metric_lines(str(run))] == [1, 2, 3]
    # rank 0's count of what the guard saw: the loop's collectives, the loss's gather, DeepSpeed's
    summary = next(line for line in out.stdout.splitlines() if "train.check_collectives:" in line)
    for caller in ("mmtrain/device.py", "mmtrain/model/losses.py", "deepspeed/"):
        assert f" from {caller}" in summary, summary
