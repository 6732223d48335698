"""The speed switches give the default's results: attention "math" vs "sdpa", activation
checkpointing on vs off, torch.compile vs eager (one process, the tiny model), and the "local"
contrastive loss vs the "global" one on 2 real gloo ranks (loss and gradients within 1e-5).

MMTRAIN_TEST_DEVICE picks the device of the one-process tests ("cpu" by default; benchmarks/gpu.py
runs them with "cuda", in bf16 autocast there, so sdpa takes the flash kernels): the tolerances
below are per device.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmtrain.model import ModelConfig, MultimodalModel
from test_model import make_batch

DEVICE = torch.device(os.environ.get("MMTRAIN_TEST_DEVICE", "cpu"))
BF16 = DEVICE.type == "cuda"
# relative error (of the norm of the difference) allowed between a switch and the default:
# fp32 on CPU differs in rounding only; bf16 on GPU keeps ~3 significant digits per op
TOLERANCE = 5e-2 if BF16 else 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread gains little on a busy machine
    yield
    torch.set_num_threads(before)


def batch(seed=0, **present):
    """4 rows with absent modalities, short clips and captions of different lengths, on DEVICE."""
    present = {"image_present": [True, True, False, True], "text_present": [True, False, True, True],
               "audio_present": [False, True, True, True], **present}
    b = make_batch(4, seed=seed, image_size=64, frames=160, **present)
    b["mel_frames"][1] = 40
    return {k: v.to(DEVICE) for k, v in b.items()}


def model_pair(**switch):
    """The default tiny model and one with `switch`, holding the same weights."""
    torch.manual_seed(0)
    default = MultimodalModel(ModelConfig.preset("tiny")).to(DEVICE)
    other = MultimodalModel(ModelConfig.preset("tiny", **switch)).to(DEVICE)
    other.load_state_dict(default.state_dict())
    return default, other


def loss_and_grads(model, b):
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=BF16):
        out = model(b)
    out["loss"].backward()
    return out["loss"].detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def assert_equivalent(model, reference, b, tol=TOLERANCE):
    loss, grads = loss_and_grads(model, b)
    ref_loss, ref_grads = loss_and_grads(reference, b)
    assert torch.isfinite(ref_loss) and relative_error(loss, ref_loss) <= tol, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    worst = max(grads, key=lambda n: relative_error(grads[n], ref_grads[n]))
    assert relative_error(grads[worst], ref_grads[worst]) <= 10 * tol, worst  # grads: through the whole model
    return loss


def test_math_attention_gives_sdpa_results():
    default, math = model_pair(attention="math")
    assert_equivalent(math, default, batch())
    # the switch really changes the kernel: a different mask convention would change the loss
    assert math.text.transformer.blocks[0].attn.attend is not default.text.transformer.blocks[0].attn.attend


def test_activation_checkpointing_recomputes_each_block_and_gives_the_same_gradients():
    default, checkpointed = model_pair(gradient_checkpointing=True)
    calls = {}
    blocks = [m for m in checkpointed.modules() if type(m).__name__ == "Block"]
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    assert_equivalent(checkpointed, default, batch(), tol=0.0 if not BF16 else TOLERANCE)
    # forward, then the recompute in backward (which stops early, before the block returns): every
    # block is its own checkpoint
    assert calls == {i: 2 for i in range(len(blocks))} and len(blocks) == 6


def test_compiled_model_matches_eager_in_one_graph_that_new_masks_do_not_recompile():
    from torch._dynamo.utils import counters

    default, compiled = model_pair(gradient_checkpointing=True)
    # CPU: dynamo's capture and AOT autograd without inductor's C++ codegen (minutes on a small CPU);
    # inductor on CPU is what the 2-worker run with --compile in test_guarantees_train.py uses
    compiled.compile(backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    assert_equivalent(compiled, default, batch(seed=0))
    graphs = counters["stats"]["unique_graphs"]
    # other masks and caption counts, an all-absent batch (a rank that ran out steps on one): the
    # same padded shapes, so nothing recompiles
    assert_equivalent(compiled, default, batch(seed=1, text_present=[True] * 4, audio_present=[True, False] * 2))
    empty = {k: [False] * 4 for k in ("image_present", "text_present", "audio_present")}
    loss, _ = loss_and_grads(compiled, batch(seed=2, **empty))
    assert float(loss) == 0.0
    assert counters["stats"]["unique_graphs"] == graphs == 1 and not counters["graph_break"], dict(counters["graph_break"])


# ---------------------------------------------------------------- local vs global on 2 gloo ranks

def _rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # rank 0: 3 rows, an absent image and caption; rank 1: 2 rows (padded to 3 in the gather),
        # no audio at all, so its audio pairs have no valid row
        rows = [dict(image_present=[True, False, True], text_present=[True, True, False],
                     audio_present=[True, True, True]),
                dict(image_present=[True, True], text_present=[True, True], audio_present=[False, False])][rank]
        b = make_batch(len(rows["image_present"]), seed=10 + rank, image_size=64, frames=160, **rows)
        result = {}
        for kind in ("global", "local"):
            torch.manual_seed(0)  # the same weights on both ranks and in both runs
            model = MultimodalModel(ModelConfig.preset("tiny", contrastive_loss=kind))
            out_ = model(b)
            out_["loss"].backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            dist.all_reduce(grads)
            grads /= 2  # what DeepSpeed's (and DDP's) gradient averaging applies
            result[kind] = {"loss": out_["loss"].detach(), "grads": grads,
                            **{k: v for k, v in out_.items() if k.startswith("loss_")}}
        torch.save(result, os.path.join(out, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_local_contrastive_loss_equals_global_on_two_ranks(tmp_path):
    from conftest import free_port

    mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"{rank}.pt")
        glob, local = r["global"], r["local"]
        for key in ("loss", "loss_image_text", "loss_image_audio", "loss_text_audio", "loss_caption"):
            assert abs(float(local[key]) - float(glob[key])) <= 1e-5, (rank, key, local[key], glob[key])
        assert float(glob["loss_image_text"]) > 0 and float(glob["loss_image_audio"]) > 0
        assert (local["grads"] - glob["grads"]).abs().max() <= 1e-5
        assert glob["grads"].abs().max() > 1e-3  # the gradients compared are not all zero
