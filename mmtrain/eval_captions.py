"""`evaluate`'s caption pass: caption loss and generated captions over Ray Data, in a pool of
model actors (the pattern of `inference.batch_embed`, one model per actor, on GPUs when asked).

A second pass over the shards rather than a column of the embedding pass: the embedding pass
is `embed`'s own code path (`embedded_rows`), whose output rows hold vectors, not the decoded
pixels and log-mels the caption decoder needs; keeping it untouched keeps `evaluate` and
`embed` one path. The price is decoding the (held-out, small) shards twice.
"""
from __future__ import annotations

import numpy as np


class CaptionEvalActor:
    """`map_batches` callable class: per decoded row, the caption decoder's summed next-token
    cross-entropy share and token count (teacher forcing, as training's caption loss) and a
    greedy generated caption, for the rows with a caption and an image or audio to caption it
    from; other rows get zeros and empty strings."""

    def __init__(self, model_path: str, storage_options: dict | None = None, max_len: int | None = None):
        import ray
        import torch

        from .inference.loaded import load_model

        # the device comes from Ray, as in EmbedActor: an actor given a GPU sees only its own
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.loaded = load_model(model_path, device=device, storage_options=storage_options)
        self.max_len = max_len

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from .inference.caption import caption_rows
        from .inference.inputs import model_batch
        from .model.losses import caption_targets

        n = len(rows["key"])
        can = (np.asarray(rows["text_present"], bool)
               & (np.asarray(rows["image_present"], bool) | np.asarray(rows["audio_present"], bool)))
        out = {"source": np.array([str(s) for s in rows["source"]], object),
               "key": np.array([str(k) for k in rows["key"]], object),
               "reference": np.array([str(t) if c else "" for t, c in zip(rows["text"], can)], object),
               "generated": np.array([""] * n, object),
               "ce": np.zeros(n, np.float64), "tokens": np.zeros(n, np.int64)}
        if not can.any():
            return out
        sub = {k: np.asarray(v)[can] for k, v in rows.items()}
        with torch.no_grad():
            batch = model_batch(sub, self.loaded)  # exactly the captioned rows: no padding rows
            tokens = (caption_targets(batch["text_ids"], torch.ones(int(can.sum()), dtype=torch.bool,
                                                                    device=batch["text_ids"].device)) != -100).sum(1)
            # the model gives the batch's mean over its tokens: the sum, split over the rows by
            # their token counts, sums back exactly over any batching (only totals are used)
            ce_sum = float(self.loaded.model.caption_loss(batch)) * int(tokens.sum())
        tokens = tokens.cpu().numpy()
        out["tokens"][can] = tokens
        out["ce"][can] = ce_sum * tokens / max(1, int(tokens.sum()))
        out["generated"][can] = caption_rows(self.loaded, sub, max_len=self.max_len)
        return out


def caption_pass(model_path: str, shards: list[str], data_cfg, *, preprocessed: bool, workers: int,
                 batch_size: int, gpus_per_worker: float = 0, max_len: int | None = None,
                 storage_options: dict | None = None, bar=None) -> dict:
    """{"loss": token-mean caption cross-entropy or None, "generated": [...], "references": [...]}
    over the samples of `shards` that have a caption and something to caption it from
    (generated and references aligned, in the order the rows arrive)."""
    from ray.data import ActorPoolStrategy

    from pipelines.ingest import build_dataset

    from .inference.batch_embed import actor_cpus

    ds = build_dataset(shards, data_cfg, seed=0, preprocessed=preprocessed, storage_options=storage_options)
    ds = ds.map_batches(CaptionEvalActor, fn_constructor_kwargs={"model_path": model_path,
                                                                 "storage_options": storage_options,
                                                                 "max_len": max_len},
                        batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=workers),
                        num_cpus=actor_cpus(workers, gpus_per_worker), num_gpus=gpus_per_worker or None)
    ce, tokens, generated, references = 0.0, 0, [], []
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        ce, tokens = ce + float(b["ce"].sum()), tokens + int(b["tokens"].sum())
        if bar is not None:
            bar.update(len(b["key"]))
        for g, r, t in zip(b["generated"], b["reference"], b["tokens"]):
            if t > 0:
                generated.append(str(g))
                references.append(str(r))
    return {"loss": ce / tokens if tokens else None, "generated": generated, "references": references}
