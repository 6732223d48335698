"""The probe: a fixed synthetic batch and the engine's outputs on it at the end of training,
saved as RUN/probe.pt; the exported weights must reproduce them (see export.verify_probe)."""
from __future__ import annotations

import os

import torch

from .config import RunConfig


def probe_batch(cfg: RunConfig, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(1234)
    size, mels, frames = cfg.data.image.size, cfg.data.audio.n_mels, cfg.data.audio.num_frames
    ids = torch.randint(3, min(cfg.model.vocab_size, 200), (n, cfg.model.max_text_len), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    return {"image": torch.randn(n, 3, size, size, generator=g), "image_present": torch.ones(n, dtype=torch.bool),
            "text_ids": ids, "text_present": torch.ones(n, dtype=torch.bool),
            "mel": torch.randn(n, mels, frames, generator=g), "mel_frames": torch.full((n,), frames),
            "audio_present": torch.ones(n, dtype=torch.bool)}


def write_probe(engine, cfg: RunConfig, rank: int, device) -> None:
    """Every rank runs it (ZeRO-3 gathers parameters collectively); rank 0 writes it."""
    batch = probe_batch(cfg)
    engine.module.eval()
    with torch.no_grad():
        out = engine.module.encode({k: v.to(device) for k, v in batch.items()})
    engine.module.train()
    if rank == 0:
        torch.save({"batch": batch, "encode": {k: v.float().cpu() for k, v in out.items()}},
                   os.path.join(cfg.run_dir, "probe.pt"))
