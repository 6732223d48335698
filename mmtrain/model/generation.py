"""Beam search over the caption decoder, and the score it ranks captions by.

A caption is scored by its **mean log-probability per generated token** (the EOS included:
stopping is one of the model's predictions), i.e. sum(log p) / length ** alpha with alpha = 1,
HF's default `length_penalty=1.0`. Why normalize: every token adds a negative log-probability,
so raw sums prefer the shortest hypothesis, and a finished "a red" would beat the full caption.
Why the plain mean rather than GNMT's ((5 + length) / 6) ** 0.6: that tuned compromise is for
translation, where a source sentence implies the target's length; a caption has no such cue, and
the mean is a per-token likelihood, comparable across lengths (exp(-score) is the perplexity).

Finished hypotheses are kept as in HF's `BeamHypotheses`: a step takes the 2K best (beam, token)
candidates; one that ends with EOS and ranks among the best K joins the row's pool of at most K
finished captions (the best K by score), the best K that do not end become the next beams. A row
is done once its pool holds K captions none of which scores below the best live beam's score so
far (HF's default, `early_stopping=False`); rows still running at `max_len` offer their live
beams, unfinished, to the pool. The answer is the pool's best. Stopping as soon as K captions
finish (HF's `early_stopping=True`) was tried and dropped: short captions finish first, fill the
pool, and cut off a longer one of higher mean (on the demo's held-out set 4 of 16 captions came
out worse than greedy's; with this rule none did). The rule is a heuristic, not a bound: a mean
can still rise after the row stops, and the exact bound (sum / max_len) would almost never stop.

With K = 1 this is greedy decoding, token for token: the one beam kept is the argmax, and when
the argmax is EOS the caption enters the pool while the live beam, the runner-up token at the
same length, scores no better, so the row stops at its first EOS as greedy does. Scores are
float64, so that adding the beam's score and subtracting the log-sum-exp never merges two
different float32 logits into a tie that could pick another token than the argmax.

No KV cache: each step re-runs the decoder on the prefixes, as `generate_caption` does: simple,
and at caption lengths (<= 64 tokens) affordable; a cache is the next step where captioning
time matters (a step then costs one token's work instead of the whole prefix's).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import PAD_ID

LENGTH_PENALTY = 1.0  # alpha: score = sum(log p) / generated_tokens ** alpha


class _Pool:
    """The finished captions of each row: ids [B, K, max_len] (PAD after the end), their
    normalized scores [B, K] (-inf: an empty slot) and lengths [B, K] (BOS included)."""

    def __init__(self, rows: int, beams: int, max_len: int, device: torch.device, alpha: float):
        self.ids = torch.full((rows, beams, max_len), PAD_ID, dtype=torch.long, device=device)
        self.score = torch.full((rows, beams), float("-inf"), dtype=torch.float64, device=device)
        self.length = torch.zeros(rows, beams, dtype=torch.long, device=device)
        self.beams, self.max_len, self.alpha = beams, max_len, alpha

    def add(self, ids: Tensor, logprob_sum: Tensor) -> None:
        """Offer captions ids [B, C, L] (BOS ... and their EOS, if any) with summed log-probs
        [B, C] (-inf: not offered); each row keeps its best K."""
        length = ids.shape[2]
        score = logprob_sum / float(length - 1) ** self.alpha
        padded = torch.nn.functional.pad(ids, (0, self.max_len - length), value=PAD_ID)
        every_ids = torch.cat([self.ids, padded], dim=1)
        every_length = torch.cat([self.length, torch.full_like(score, length, dtype=torch.long)], dim=1)
        self.score, best = torch.cat([self.score, score], dim=1).topk(self.beams, dim=1)
        self.ids = every_ids.gather(1, best[:, :, None].expand(-1, -1, self.max_len))
        self.length = every_length.gather(1, best)

    def settled(self, best_live: Tensor, generated: int) -> Tensor:
        """[B] bool: the pool holds K captions and none is worse than the best live beam's
        score so far (summed log-prob `best_live` over `generated` tokens)."""
        return torch.isfinite(self.score[:, -1]) & (self.score[:, -1] >= best_live / float(generated) ** self.alpha)


@torch.no_grad()
def beam_search(model, batch: dict[str, Tensor], max_len: int | None, beams: int, bos_id: int = 1,
                eos_id: int = 2, *, length_penalty: float = LENGTH_PENALTY) -> Tensor:
    """Captions [B, <= max_len] int64 (BOS, tokens, EOS, then PAD), the best of a `beams`-wide
    search by mean log-probability per token; beams=1 gives `generate_caption`'s greedy ids.
    A row with neither image nor audio gets the empty caption [BOS, EOS]. `max_len` (None: the
    model's `max_text_len`, which also caps it) counts BOS and EOS. Call in eval mode."""
    cfg = model.cfg
    max_len = min(max_len or cfg.max_text_len, cfg.max_text_len)
    if beams < 1 or max_len < 2:
        raise ValueError(f"beam search needs beams >= 1 and max_len >= 2, got {beams} and {max_len}")
    if 2 * beams > cfg.vocab_size:
        raise ValueError(f"{beams} beams need a vocabulary of at least {2 * beams} tokens, not {cfg.vocab_size}")
    fused, fused_mask, has_input = model.caption_context(batch)
    B, K, V, device = fused.shape[0], beams, cfg.vocab_size, fused.device
    context, context_mask = fused.repeat_interleave(K, dim=0), fused_mask.repeat_interleave(K, dim=0)
    ids = torch.full((B, K, 1), bos_id, dtype=torch.long, device=device)
    # every beam starts as the same BOS: only the first counts, or step one would pick K copies
    live = torch.full((B, K), float("-inf"), dtype=torch.float64, device=device)
    live[:, 0] = 0.0
    pool = _Pool(B, K, max_len, device, length_penalty)
    first_k = torch.arange(2 * K, device=device) < K
    done = ~has_input
    for _ in range(max_len - 1):
        hidden = model.decoder(ids.flatten(0, 1), context, context_mask)[:, -1]
        logp = torch.log_softmax(model.decoder.head(hidden).double(), dim=-1).view(B, K, V)
        score, flat = (live[:, :, None] + logp).view(B, K * V).topk(2 * K, dim=1)  # best first
        beam, token = flat // V, flat % V
        grown = torch.cat([ids.gather(1, beam[:, :, None].expand(-1, -1, ids.shape[2])), token[:, :, None]], dim=2)
        ended = token == eos_id
        pool.add(grown, score.masked_fill(~(ended & first_k & ~done[:, None]), float("-inf")))
        live, keep = score.masked_fill(ended, float("-inf")).topk(K, dim=1)
        ids = grown.gather(1, keep[:, :, None].expand(-1, -1, grown.shape[2]))
        done |= pool.settled(live[:, 0], generated=ids.shape[2] - 1)
        if bool(done.all()):
            break
    else:  # max_len reached: the rows still running offer their beams as they are (no EOS)
        pool.add(ids, live.masked_fill(done[:, None], float("-inf")))
    return _best(pool, has_input, bos_id, eos_id)


def _best(pool: _Pool, has_input: Tensor, bos_id: int, eos_id: int) -> Tensor:
    """Each row's best caption, trimmed to the longest; [BOS, EOS] for rows without input."""
    ids, length = pool.ids[:, 0].clone(), pool.length[:, 0].clone()
    ids[~has_input] = PAD_ID
    ids[~has_input, 0], ids[~has_input, 1] = bos_id, eos_id
    length[~has_input] = 2
    return ids[:, :int(length.max())]


@torch.no_grad()
def caption_scores(model, batch: dict[str, Tensor], ids: Tensor, eos_id: int = 2, *,
                   length_penalty: float = LENGTH_PENALTY) -> Tensor:
    """The score beam search ranks by, of given captions ids [B, L] (BOS first; a caption ends
    at its first EOS, or runs to L), recomputed by teacher forcing: float64 [B]."""
    fused, fused_mask, _ = model.caption_context(batch)
    hidden = model.decoder(ids[:, :-1], fused, fused_mask)
    logp = torch.log_softmax(model.decoder.head(hidden).double(), dim=-1)
    target = ids[:, 1:]
    token_logp = logp.gather(2, target[:, :, None]).squeeze(2)
    ended = target == eos_id
    steps = torch.where(ended.any(dim=1), ended.long().argmax(dim=1) + 1, target.shape[1])
    counted = torch.arange(target.shape[1], device=ids.device)[None, :] < steps[:, None]
    return token_logp.masked_fill(~counted, 0.0).sum(dim=1) / steps.double() ** length_penalty
