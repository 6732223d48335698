import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from mmtrain.model import (
    PRESETS,
    ModelConfig,
    MultimodalModel,
    available_models,
    build_model,
    count_parameters,
    flops_per_sample,
    register_model,
    token_counts,
)
from mmtrain.model.losses import contrastive_loss
from mmtrain.tokenizer import ByteTokenizer, pad_batch

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
ANIMALS = ["dog", "cat", "bird", "horse", "cow", "frog", "sheep", "goat"]
PARTS = ("loss_image_text", "loss_image_audio", "loss_text_audio", "loss_caption")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are small: a second intra-op thread gains little, and on a busy 2-core machine
    # its spin-waiting makes steps many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_batch(B=4, seed=0, image_size=224, frames=1001, text_len=64, **present):
    """A batch following the ingest contract; `present` overrides e.g. audio_present=[...]."""
    g = torch.Generator().manual_seed(seed)
    tok = ByteTokenizer()
    captions = [f"a {COLORS[i % 8]} {ANIMALS[(i + seed) % 8]} number {i}" for i in range(B)]
    batch = {
        "image": torch.randn(B, 3, image_size, image_size, generator=g),
        "text_ids": torch.from_numpy(pad_batch([tok.encode(c, text_len) for c in captions], 0, text_len)),
        "mel": torch.randn(B, 80, frames, generator=g),
        "mel_frames": torch.full((B,), frames, dtype=torch.long),
    }
    for name in ("image", "text", "audio"):
        flags = present.get(f"{name}_present", [True] * B)
        batch[f"{name}_present"] = torch.tensor(flags, dtype=torch.bool)
    # The ingest zeroes the data of missing rows.
    batch["image"][~batch["image_present"]] = 0
    batch["text_ids"][~batch["text_present"]] = 0
    batch["mel"][~batch["audio_present"]] = 0
    batch["mel_frames"][~batch["audio_present"]] = 0
    return batch


def tiny(seed=0, **overrides) -> MultimodalModel:
    torch.manual_seed(seed)
    return build_model(ModelConfig.preset("tiny", **overrides))


def test_forward_all_modalities():
    model = tiny()
    out = model(make_batch(4))
    assert set(out) == {"loss", *PARTS, "logit_scale"}
    assert out["loss"].dim() == 0 and out["loss"].requires_grad and torch.isfinite(out["loss"])
    for k in PARTS:
        assert torch.isfinite(out[k]) and out[k] > 0, k
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    expected = sum(out[k] for k in PARTS)  # default weights are 1
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)

    emb = model.encode(make_batch(4))
    for name in ("image", "text", "audio"):
        assert emb[name].shape == (4, 128)
        torch.testing.assert_close(emb[name].norm(dim=-1), torch.ones(4))


def test_smaller_inputs_slice_positions():
    model = tiny()
    out = model(make_batch(3, image_size=96, frames=250, text_len=20))
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError):
        model(make_batch(2, text_len=65))


def test_missing_modalities():
    model = tiny()
    # No audio anywhere: every pair with audio is exactly 0; the rest still train.
    out = model(make_batch(4, audio_present=[False] * 4))
    assert out["loss_image_audio"] == 0 and out["loss_text_audio"] == 0
    assert out["loss_image_text"] > 0 and out["loss_caption"] > 0

    # Only one row has both image and text: a pair needs >= 2 rows for negatives.
    out = model(make_batch(4, image_present=[True, False, False, False]))
    assert out["loss_image_text"] == 0 and out["loss_image_audio"] == 0
    assert out["loss_text_audio"] > 0 and out["loss"].requires_grad

    # No image and no audio: nothing to caption from, and no pair at all.
    out = model(make_batch(4, image_present=[False] * 4, audio_present=[False] * 4))
    for k in PARTS:
        assert out[k] == 0, k
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    out["loss"].backward()  # the graph is valid even when everything is zero

    # Mixed rows: encode returns zeros for absent rows, unit vectors for the others.
    batch = make_batch(4, image_present=[True, False, True, True], text_present=[True, True, False, True],
                       audio_present=[False, True, True, True])
    out = model(batch)
    assert all(torch.isfinite(out[k]) for k in out)
    emb = model.encode(batch)
    for name in ("image", "text", "audio"):
        norms = emb[name].norm(dim=-1)
        torch.testing.assert_close(norms, batch[f"{name}_present"].float())

    # A modality missing from the batch entirely (no "mel" key).
    batch = make_batch(4)
    for k in ("mel", "mel_frames", "audio_present"):
        del batch[k]
    out = model(batch)
    assert out["loss_image_audio"] == 0 and out["loss_image_text"] > 0
    assert model.encode(batch)["audio"].abs().sum() == 0


def test_absent_data_and_padding_do_not_matter():
    model = tiny().eval()
    batch = make_batch(4, text_present=[True, True, False, True])
    batch["mel_frames"][0] = 500
    ref_out, ref_emb = model(batch), model.encode(batch)
    junk = {k: v.clone() for k, v in batch.items()}
    junk["mel"][0, :, 500:] = 7.0                     # beyond the row's valid frames
    junk["text_ids"][2] = torch.randint(3, 259, (64,))  # a row whose text is absent
    out, emb = model(junk), model.encode(junk)
    for k in ref_out:
        torch.testing.assert_close(out[k], ref_out[k])
    for k in ref_emb:
        torch.testing.assert_close(emb[k], ref_emb[k])


@pytest.mark.parametrize("longest", [300, 1001])
def test_inference_trims_only_padding_no_row_reaches(longest):
    """mmtrain.inference.inputs.trimmed: text cut after the longest caption, log-mels one audio
    token past the longest clip; every embedding and the caption loss as on the full batch.
    Random biases: a padding window's stem output is then not zero, so a mel cut at the last
    valid token would change that row's last token (the kernel-3 conv reads one further)."""
    from mmtrain.inference.inputs import trimmed

    model = tiny().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = make_batch(4, audio_present=[True, True, False, True])
    batch["mel_frames"] = torch.tensor([longest, 17, 0, 160])
    batch["mel"] *= (torch.arange(1001) < batch["mel_frames"][:, None])[:, None, :]  # as the ingest zeroes it
    cut = trimmed({k: v.clone() for k, v in batch.items()}, model.cfg.audio_stride)
    assert cut["text_ids"].shape[1] == int((batch["text_ids"] != 0).sum(dim=1).max()) < 64
    assert cut["mel"].shape[-1] == min(1001, (-(-longest // 16) + 1) * 16)
    with torch.no_grad():
        full, short = model.encode(batch), model.encode(cut)
        for k in full:
            torch.testing.assert_close(short[k], full[k], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(model.caption_loss(cut), model.caption_loss(batch), atol=1e-5, rtol=1e-5)
        # the cut that stops at the last valid token is not the same batch: the test can tell
        if longest < 1001:
            tight = dict(cut, mel=cut["mel"][..., :-16])
            assert (model.encode(tight)["audio"][0] - full["audio"][0]).abs().max() > 1e-4


def test_caption_needs_image_or_audio():
    model = tiny()
    batch = make_batch(4, image_present=[False, False, True, True], audio_present=[False, False, False, True])
    with_rows = model.caption_loss(batch)
    assert with_rows > 0
    batch = make_batch(4, image_present=[False] * 4, audio_present=[False] * 4)
    assert model.caption_loss(batch) == 0


def test_gradients_reach_all_encoders():
    model = tiny()
    model(make_batch(4))["loss"].backward()
    for part in ("image", "text", "audio", "fusion", "decoder"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        assert all(g is not None for g in grads), part
        assert sum(g.abs().sum().item() for g in grads) > 0, part
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0


def test_gradient_checkpointing_matches():
    plain, ckpt = tiny(seed=1), tiny(seed=2, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    batch = make_batch(2, image_size=64, frames=200, text_len=16)
    a, b = plain(batch)["loss"], ckpt(batch)["loss"]
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_overfit_fixed_batch():
    model = tiny()
    batch = make_batch(8, image_size=224, frames=1001, text_len=48)  # 8 distinct subjects
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(20):
        loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_bf16_weights_take_float32_batch():
    # DeepSpeed bf16 converts the weights but not the batch: the model casts its inputs.
    model = tiny().to(torch.bfloat16)
    out = model(make_batch(3, image_size=64, frames=160, text_len=16, audio_present=[True, False, True]))
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert model.audio.stem[0].weight.grad.dtype == torch.bfloat16


def test_eval_is_deterministic():
    model = tiny().eval()
    batch = make_batch(4)
    a, b = model(batch), model(batch)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = model.generate_caption(batch, max_len=10)
    assert ids.shape[0] == 4 and ids.shape[1] <= 10 and (ids[:, 0] == 1).all()
    assert torch.equal(ids, model.generate_caption(batch, max_len=10))


def test_safetensors_round_trip(tmp_path):
    cfg = ModelConfig.preset("tiny", embed_dim=64)
    model = tiny(embed_dim=64).eval()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))

    torch.manual_seed(123)  # a different init, so equality proves the load
    fresh = build_model(ModelConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))).eval()
    batch = make_batch(4, audio_present=[True, False, True, True])
    assert not torch.equal(fresh.encode(batch)["image"], model.encode(batch)["image"])
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    a, b = model.encode(batch), fresh.encode(batch)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(model(batch)["loss"], fresh(batch)["loss"])


def test_registry_custom_model():
    assert "multimodal" in available_models()
    assert isinstance(build_model(ModelConfig()), MultimodalModel)

    @register_model("test_linear_probe")
    class LinearProbe(nn.Module):
        def __init__(self, cfg: ModelConfig):
            super().__init__()
            self.proj = nn.Linear(3, cfg.embed_dim)

        def encode(self, batch):
            e = nn.functional.normalize(self.proj(batch["image"].mean(dim=(2, 3))), dim=-1)
            return {"image": e, "text": e, "audio": e}

        def forward(self, batch):
            return {"loss": self.encode(batch)["image"].sum()}

    model = build_model(ModelConfig(name="test_linear_probe", embed_dim=16))
    assert isinstance(model, LinearProbe) and "test_linear_probe" in available_models()
    assert model.encode(make_batch(2, image_size=32))["image"].shape == (2, 16)
    with pytest.raises(ValueError):
        register_model("test_linear_probe")(lambda cfg: nn.Linear(1, 1))
    with pytest.raises(ValueError, match="unknown model"):
        build_model(ModelConfig(name="nope"))


def test_config_round_trip_and_validation():
    cfg = ModelConfig.preset("base", dropout=0.1)
    assert ModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    assert ModelConfig() == PRESETS["tiny"]
    with pytest.raises(ValueError, match="unknown model config key") as e:
        ModelConfig.from_dict({"width": 64, "widht": 64})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError):
        ModelConfig.preset("tiny", depth=3)
    with pytest.raises(ValueError):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError):
        ModelConfig(width=100, heads=3)


def test_preset_sizes():
    counts = {}
    for name in ("tiny", "small", "base", "large", "xl"):
        with torch.device("meta"):  # shapes only: no memory for billions of parameters
            counts[name] = count_parameters(build_model(ModelConfig.preset(name)))
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["large"] < counts["xl"]
    assert 1e6 < counts["tiny"] < 5e6
    assert 100e6 < counts["base"] < 200e6
    assert 0.8e9 < counts["large"] < 1.3e9
    assert 2.5e9 < counts["xl"] < 3.5e9

    flops = [flops_per_sample(PRESETS[n], *token_counts(PRESETS[n], 224, 64, 1001)) for n in counts]
    assert flops == sorted(flops) and flops[0] > 0
    # Sanity: 6 * params * tokens, where a parameter sees on the order of 100-1000 tokens.
    assert 6 * counts["base"] * 100 < flops[2] < 6 * counts["base"] * 1000


def test_contrastive_loss_edge_cases():
    torch.manual_seed(0)
    a = nn.functional.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(10.0, requires_grad=True)
    one = contrastive_loss(a, a, torch.tensor([False, True, False, False, False]), scale)
    none = contrastive_loss(a, a, torch.zeros(5, dtype=torch.bool), scale)
    assert one.item() == 0 and none.item() == 0 and one.requires_grad
    # Absent rows neither count as positives nor as negatives.
    valid = torch.tensor([True, True, False, True, False])
    full = contrastive_loss(a, a, valid, scale)
    sub = contrastive_loss(a[valid], a[valid], torch.ones(3, dtype=torch.bool), scale)
    torch.testing.assert_close(full, sub)
    # Matching pairs at a large scale give a loss near 0, shuffled ones a large loss.
    big = torch.tensor(100.0)
    assert contrastive_loss(a, a, torch.ones(5, dtype=torch.bool), big) < 1e-3
    assert contrastive_loss(a, a.roll(1, 0), torch.ones(5, dtype=torch.bool), big) > 1


_GATHER_WORKER = """
import sys, torch, torch.distributed as dist, torch.nn as nn
from mmtrain.model.losses import contrastive_loss, gather_rows
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(0)
emb = nn.functional.normalize(torch.randn(5, 8), dim=-1)
present = torch.tensor([[True], [True], [False], [True], [True]])
rows = [slice(0, 3), slice(3, 5)][rank]  # unequal batch sizes: 3 and 2
local = emb[rows].clone().requires_grad_(True)
g_emb, g_present = gather_rows(local, present[rows])
loss = contrastive_loss(g_emb, g_emb.roll(1, 0), g_present[:, 0], torch.tensor(5.0))
loss.backward()
torch.save({"loss": loss.detach(), "grad": local.grad, "n": g_emb.shape[0]}, f"{out}/{rank}.pt")
dist.barrier()  # neither rank tears gloo down while the other still talks
dist.destroy_process_group()
"""


def test_gather_across_ranks(tmp_path):
    """Two gloo ranks with batches of 3 and 2 give the loss and gradient of the whole batch of 5."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _GATHER_WORKER, str(r), str(port), str(tmp_path)], env=env)
        for r in range(2)
    ]
    try:
        codes = [p.wait(timeout=120) for p in procs]
        # Judged by the results, not the exit codes: gloo's teardown can rarely abort a rank after
        # its work is done, which is not what this test is about.
        assert (tmp_path / "0.pt").exists() and (tmp_path / "1.pt").exists(), f"ranks exited {codes}"
    finally:
        for p in procs:  # a rank stuck in a collective must not outlive the test
            if p.poll() is None:
                p.kill()
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert r0["n"] == r1["n"] == 6  # padded to 2 x 3; the padding row is marked absent

    # Reference: the same loss in one process over the padded, gathered layout.
    torch.manual_seed(0)
    emb = nn.functional.normalize(torch.randn(5, 8), dim=-1)
    full = torch.cat([emb[:3], emb[3:], torch.zeros(1, 8)]).requires_grad_(True)
    present = torch.tensor([True, True, False, True, True, False])
    ref = contrastive_loss(full, full.roll(1, 0), present, torch.tensor(5.0))
    ref.backward()
    torch.testing.assert_close(r0["loss"], ref.detach())
    torch.testing.assert_close(r1["loss"], ref.detach())
    # Each rank's gradient is world x d(global loss)/d(own rows); averaging over ranks (DDP,
    # DeepSpeed) then gives exactly the gradient of the global loss.
    torch.testing.assert_close(r0["grad"], 2 * full.grad[:3])
    torch.testing.assert_close(r1["grad"], 2 * full.grad[3:5])
    assert math.isfinite(ref.item())


def test_encoding_with_a_loaded_model_leaves_torch_dynamo_for_a_compiled_run(tmp_path):
    """Every process that loads a model (each embedding actor, serve replica, command) imported
    torch._dynamo (~1.5 s of CPU) for the loss's two compile-break decorators; they import it at
    their first call now, which only a training step makes. Here a process loads an exported
    model and embeds a batch, and has not imported it."""
    import subprocess
    import sys

    code = """
import sys
from mmtrain.export import export_untrained
export_untrained(sys.argv[1])
from mmtrain.inference.inputs import embed_items
from mmtrain.inference.loaded import load_model
vectors = embed_items([{"text": "a red circle"}], load_model(sys.argv[1]))
assert vectors["text"].shape[0] == 1
print("torch._dynamo" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.safetensors")], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_the_loss_collectives_run_eagerly_inside_a_compiled_step(monkeypatch):
    """A collective inside a compiled graph: the graph breaks at the decorated function, which
    (with everything it calls) runs eagerly. Two fake ranks: the collective records whether it
    ran while dynamo was tracing."""
    import torch._dynamo

    from mmtrain.model import losses

    seen = []

    def all_reduce(t):
        seen.append(torch.compiler.is_compiling())
        t.mul_(2)

    monkeypatch.setattr(losses, "_distributed", lambda: True)
    monkeypatch.setattr(losses.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(losses.dist, "all_reduce", all_reduce)

    def step(x):
        return losses.global_from_shares(x * 2) + 1

    torch._dynamo.reset()
    x = torch.ones(3)
    got = torch.compile(step, backend="eager", fullgraph=False)(x)
    torch.testing.assert_close(got, torch.full((3,), 5.0))  # the value: every rank's shares summed
    assert seen == [False]
    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 1 and "global_from_shares" in str(explained.break_reasons[0].reason)
    torch._dynamo.reset()
