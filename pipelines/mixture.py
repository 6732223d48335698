"""Weighted mixtures of corpora: which samples of which source each epoch of a run serves.

An epoch of a mixture is `samples_per_epoch` samples, of which source s contributes its quota
q_s: its share of the weights (largest-remainder rounding, so the quotas add up exactly).
Each source is an endless stream of its own epochs: source epoch k lists the source's shards
in a permutation seeded by (seed, source name, k), each shard's samples in their order. Epoch
e of the run takes the stream positions [e*q_s, (e+1)*q_s) of every source s, so

- a small source is repeated: its stream runs on into its next epoch within one run epoch;
- a large source is subsampled: one of its epochs spans several run epochs;
- every sample is served once per source epoch, because stream positions never repeat.

The plan is a pure function of (sources, shard counts, quotas, seed): every worker, attempt
and worker count computes the same pieces. A piece is one shard's sample range in one source
epoch; the data position keys the ids it serves by the piece's `part`, "NAME/K", so after a
crash what was trained on is skipped per (source, source epoch) (mmtrain/data_position.py).

Weighted mixing with per-source epochs is what webdataset's RandomMix and Mosaic Streaming's
stream proportions do by sampling; they cannot say after a crash which samples of a repeated
source's current epoch were served. Ranges of a deterministic stream can, hence this module.
"""
from __future__ import annotations

import bisect
import math
import random
import re
from dataclasses import dataclass

from .errors import ConfigError

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Piece:
    source: str        # the source's name
    source_epoch: int  # which of the source's own epochs
    shard: str
    start: int         # sample positions [start, stop) within the shard
    stop: int
    order: float       # where the piece starts within the run epoch, as a fraction of the source's quota

    @property
    def part(self) -> str:
        return part_name(self.source, self.source_epoch)


def part_name(source: str, source_epoch: int) -> str:
    return f"{source}/{source_epoch}"


def source_of_part(part) -> str | None:
    """The source name of a data-position part, None for a plain run's epoch number."""
    return part.rsplit("/", 1)[0] if isinstance(part, str) and "/" in part else None


@dataclass(frozen=True)
class MixSource:
    name: str
    shards: tuple[str, ...]
    counts: tuple[int, ...]  # samples per shard, in `shards` order
    quota: int               # samples per run epoch

    @property
    def size(self) -> int:
        return sum(self.counts)


class Mixture:
    def __init__(self, sources: list[MixSource], seed: int):
        self.sources, self.seed = list(sources), seed
        self._orders: dict[tuple[str, int], tuple[list[str], list[int]]] = {}
        self._count = {s.name: dict(zip(s.shards, s.counts)) for s in self.sources}

    @classmethod
    def plan(cls, sources: list[tuple[str, dict[str, int], float | None, float | None]],
             samples_per_epoch: int | None, seed: int) -> "Mixture":
        """`sources`: (name, samples per shard, weight, repeat) each, with weight or repeat set
        (repeat r weighs a source as r times its size). `samples_per_epoch` defaults to the sum
        of the sources' sizes with weights, to the sum of repeat x size with repeats."""
        sizes = {name: sum(counts.values()) for name, counts, _, _ in sources}
        for name, size in sizes.items():
            if size == 0:
                raise ConfigError(f"data source {name} has no samples")
        weighted = [w is not None for _, _, w, _ in sources]
        if any(weighted) and not all(weighted):
            raise ConfigError("data sources: give every source a weight, or every source a repeat (not both kinds)")
        shares = {name: (w if w is not None else (1.0 if r is None else r) * sizes[name])
                  for name, _, w, r in sources}
        total = samples_per_epoch or (sum(sizes.values()) if all(weighted) else round(sum(shares.values())))
        quotas = _largest_remainder(shares, total)
        for name, quota in quotas.items():
            if quota == 0:
                raise ConfigError(f"data source {name}: its share of {total} samples per epoch rounds to none; "
                                  f"raise its weight or train.samples_per_epoch")
        return cls([MixSource(name, tuple(counts), tuple(counts.values()), quotas[name])
                    for name, counts, _, _ in sources], seed)

    @property
    def samples_per_epoch(self) -> int:
        return sum(s.quota for s in self.sources)

    def shards(self) -> list[str]:
        return [shard for s in self.sources for shard in s.shards]

    def shard_order(self, source: MixSource, source_epoch: int) -> tuple[list[str], list[int]]:
        """The source's shards with samples, in source epoch k's order, and the stream
        position each starts at within that epoch."""
        key = (source.name, source_epoch)
        if key not in self._orders:
            if len(self._orders) > 4096:
                self._orders.clear()
            order = [s for s in source.shards if self._count[source.name][s] > 0]
            random.Random(f"{self.seed}:{source.name}:{source_epoch}").shuffle(order)
            starts, at = [], 0
            for shard in order:
                starts.append(at)
                at += self._count[source.name][shard]
            self._orders[key] = (order, starts)
        return self._orders[key]

    def pieces(self, epoch: int) -> list[Piece]:
        """The pieces run epoch `epoch` serves, the sources interleaved by their progress
        through their quotas (so every stretch of the stream mixes them in proportion)."""
        out = []
        for source in self.sources:
            begin, end, size = epoch * source.quota, (epoch + 1) * source.quota, source.size
            at = begin
            while at < end:
                k, offset = divmod(at, size)
                order, starts = self.shard_order(source, k)
                i = bisect.bisect_right(starts, offset) - 1
                shard, into = order[i], offset - starts[i]
                take = min(end - at, self._count[source.name][shard] - into)
                out.append(Piece(source.name, k, shard, into, into + take, (at - begin) / source.quota))
                at += take
        out.sort(key=lambda p: (p.order, p.source))
        return out

    def source_epochs_done(self, epochs: int) -> dict[str, int]:
        """Per source, how many of its epochs `epochs` whole run epochs serve completely."""
        return {s.name: epochs * s.quota // s.size for s in self.sources}

    def describe(self) -> list[str]:
        return [f"{s.name}: {s.size} samples in {len(s.shards)} shards, {s.quota} per epoch "
                f"({s.quota / self.samples_per_epoch:.1%}, {s.quota / s.size:.2f}x its size)" for s in self.sources]


def _largest_remainder(shares: dict[str, float], total: int) -> dict[str, int]:
    weight = sum(shares.values())
    exact = {name: total * share / weight for name, share in shares.items()}
    quotas = {name: math.floor(x) for name, x in exact.items()}
    left = total - sum(quotas.values())
    for name in sorted(exact, key=lambda n: (quotas[n] - exact[n], n))[:left]:
        quotas[name] += 1
    return quotas
