"""Losses: symmetric InfoNCE between modality pairs, and next-token captioning CE.

Neither has a data-dependent branch: rows that do not take part get weight 0 (or the ignore
index) instead of being skipped. The loss is then always a tensor attached to the graph, 0 rather
than NaN when nothing takes part, and every rank runs the same collectives. The contrastive loss
also keeps shapes static (no boolean indexing), so it needs no host sync.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .config import PAD_ID

# Eager under torch.compile, whose graph breaks at the decorated function. torch's own lazy form
# of `torch.compiler.disable`: that one imports torch._dynamo where it decorates (~1.5 s of CPU in
# every process that imports the model: each embedding actor, serve replica and command), this
# one at the first call, which only a training step makes.
eager_under_compile = torch._disable_dynamo

# Fill for logits that must not compete in a softmax. Finite, so a row with nothing valid gives a
# finite (and zero-weighted) loss instead of NaN; far enough below the largest real logit (the
# scale is clamped at 100) that exp() underflows to exactly 0 in float32.
_MASKED = -1e4


def contrastive_loss(a: Tensor, b: Tensor, valid: Tensor, scale: Tensor) -> Tensor:
    """CLIP loss between L2-normalized rows of `a` and `b` [N, D], over rows where `valid` [N].

    Logits are cosine similarities times `scale`; row i's positive is column i, and the other
    valid rows are its negatives. The mean of the a->b and b->a cross-entropies over valid rows.

    With fewer than 2 valid rows the loss is exactly 0 without a branch: 0 rows have weight 0,
    and a single row has only itself in its softmax, so its cross-entropy is log(1) = 0.
    """
    logits = scale * (a.float() @ b.float().T)
    both = valid[:, None] & valid[None, :]
    logits = logits.masked_fill(~both, _MASKED)
    target = torch.arange(logits.shape[0], device=logits.device)
    w = valid.float()
    n = w.sum().clamp(min=1.0)
    return (_weighted_ce(logits, target, w) / n + _weighted_ce(logits.T, target, w) / n) / 2


def _weighted_ce(logits: Tensor, target: Tensor, w: Tensor) -> Tensor:
    """The cross-entropies of the rows of `logits` (already masked), weighted by `w` and summed."""
    return (F.cross_entropy(logits, target, reduction="none") * w).sum()


def local_contrastive_loss(a: Tensor, b: Tensor, valid: Tensor, scale: Tensor, rows: slice) -> Tensor:
    """This rank's share of `contrastive_loss(a, b, valid, scale)` over the gathered rows [N, D]:
    the cross-entropies of its own `rows` in both directions (a->b: its rows of `a` against every
    row of `b`; b->a: its rows of `b` against every row of `a`, i.e. its columns of the global
    logits), over the global normalizer (the valid rows of all ranks). The shares of all ranks sum
    to the global loss, and each rank builds [R, N] logits instead of [N, N] (OpenCLIP's
    --local-loss)."""
    a, b = a.float(), b.float()
    n = valid.float().sum().clamp(min=1.0)
    both = valid[rows, None] & valid[None, :]
    target = torch.arange(a.shape[0], device=a.device)[rows]
    w = valid[rows].float()

    a_to_b = _weighted_ce((scale * (a[rows] @ b.T)).masked_fill(~both, _MASKED), target, w)
    b_to_a = _weighted_ce((scale * (b[rows] @ a.T)).masked_fill(~both, _MASKED), target, w)
    return (a_to_b + b_to_a) / (2 * n)


def caption_targets(text_ids: Tensor, rows: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token targets text_ids[:, 1:], with PAD and rows outside `rows` set to ignore_index."""
    target = text_ids[:, 1:]
    keep = (target != PAD_ID) & rows[:, None]
    return target.masked_fill(~keep, ignore_index)


def caption_loss_from_logits(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over the kept targets; 0 (not NaN) when there are none."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")
    return loss / (target != -100).sum().clamp(min=1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def own_rows(total: int) -> slice:
    """This rank's rows in `gather_rows`'s output of `total` rows (every rank's padded to one count)."""
    if not _distributed():
        return slice(0, total)
    per = total // dist.get_world_size()
    return slice(dist.get_rank() * per, (dist.get_rank() + 1) * per)


@eager_under_compile  # a collective
def global_from_shares(shares: Tensor) -> Tensor:
    """Every rank's `local_contrastive_loss` shares [K] -> losses [K] whose value is the global loss
    (the shares summed over ranks) and whose gradient is world x the own share's.

    The value: what each rank reports is today's global number. The gradient: the gather's backward
    sums every rank's gradient into each rank's own rows, so world x share gives each rank the
    gradient the global loss gives it (world x d(global)/d(own rows), see `gather_rows`), and the
    gradient averaging over ranks then gives exactly the global gradient, logit scale included.
    """
    if not _distributed():
        return shares
    total = shares.detach().clone()
    dist.all_reduce(total)
    scaled = shares * dist.get_world_size()
    return scaled + (total - scaled).detach()


def gather_rows(emb: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """All-gather embeddings (with gradient) and presence masks across ranks.

    emb [B, K] float, present [B, K'] bool -> [sum of B over ranks, K], [.., K'].
    Gradients flow back through `torch.distributed.nn.functional.all_gather`, as in OpenCLIP's
    `gather_with_grad`: every rank computes the same global loss, the backward of all_gather sums
    each rank's share into its own slice, and the usual gradient averaging over ranks then gives
    exactly the gradient of the global loss.

    Ranks may hold different batch sizes (an epoch's last batch) while all_gather needs equal
    shapes, so rows are padded to the largest batch and the padding is marked absent.
    Single-process runs return the inputs unchanged.
    """
    return _gathered(emb, present) if _distributed() else (emb, present)


@eager_under_compile  # collectives and a host sync (the batch sizes)
def _gathered(emb: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    from torch.distributed.nn.functional import all_gather as all_gather_with_grad

    world = dist.get_world_size()
    n = torch.tensor([emb.shape[0]], device=emb.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    pad = int(max(s.item() for s in sizes)) - emb.shape[0]
    flags = present.to(torch.uint8)  # uint8: not every backend all-gathers (or pads) bool
    if pad:
        emb = F.pad(emb, (0, 0, 0, pad))
        flags = F.pad(flags, (0, 0, 0, pad))  # padded rows: absent
    masks = [torch.empty_like(flags) for _ in range(world)]
    dist.all_gather(masks, flags)
    with warnings.catch_warnings():
        # Recent torch marks it deprecated in favour of a private module whose names still change
        # between releases; this public function works across the supported versions (>= 2.4).
        warnings.simplefilter("ignore", FutureWarning)
        gathered = all_gather_with_grad(emb.contiguous())
    return torch.cat(gathered), torch.cat(masks).bool()
