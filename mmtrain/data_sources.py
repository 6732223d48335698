"""The run config's data section: the data plane's settings plus named, weighted sources.

    --data web=s3://corpus/web:0.6 curated=/data/curated:0.3 speech=/data/speech:0.1

or in a config file

    "data": {"sources": [{"name": "web", "paths": ["s3://corpus/web-a", "s3://corpus/web-b"], "weight": 0.6},
                         {"name": "speech", "paths": ["/data/speech"], "repeat": 2}]}

A run with sources trains on a mixture (pipelines/mixture.py); plain `--data PATH...` (no
NAME=) is one corpus, its shards concatenated, as always.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.config import DataConfig
from pipelines.errors import ConfigError
from pipelines.mixture import NAME
from pipelines.settings import Settings, setting


@dataclass(frozen=True)
class SourceConfig(Settings):
    LABEL = "data source"

    name: str = setting("", help="the source's name in metrics, audits and the data position")
    paths: tuple[str, ...] = setting((), help="preprocessed folders, shards, globs, brace patterns or URLs")
    weight: float | None = setting(None, help="share of every epoch, relative to the other sources' weights")
    repeat: float | None = setting(None, help="instead of a weight: this many times the source's size per epoch")

    def checks(self):
        yield bool(NAME.match(self.name)), (f"data source name {self.name!r}: letters, digits, _ . - "
                                            f"(starting with a letter or _)")
        yield bool(self.paths), f"data source {self.name} has no paths"
        yield self.weight is None or self.repeat is None, f"data source {self.name}: a weight or a repeat, not both"
        yield self.weight is None or self.weight > 0, f"data source {self.name}: weight must be positive"
        yield self.repeat is None or self.repeat > 0, f"data source {self.name}: repeat must be positive"


@dataclass(frozen=True)
class TrainDataConfig(DataConfig):
    sources: tuple[SourceConfig, ...] = field(default=())

    def checks(self):
        yield from super().checks()
        names = [s.name for s in self.sources]
        yield len(set(names)) == len(names), f"data source names repeat: {', '.join(names)}"
        paths = [p for s in self.sources for p in s.paths]
        yield len(set(paths)) == len(paths), "a path belongs to two data sources"

    def without_sources(self) -> DataConfig:
        """The data plane's part (what preprocessing records and checks)."""
        values = {f: getattr(self, f) for f in DataConfig.__dataclass_fields__}
        return DataConfig(**values)


def parse_data_args(entries: list[str]) -> tuple[list[str], list[dict] | None]:
    """`--data` entries -> (every path, the sources or None). Entries are all plain paths (one
    corpus) or all NAME=PATH[:WEIGHT]; NAME= given twice adds a path to that source. A path
    whose text before its first "/" holds "=" reads as NAME=PATH: write ./a=b/... for a folder
    named so."""
    named = [_split(e) for e in entries]
    if not any(n for n, _, _ in named):
        return list(entries), None
    if not all(n for n, _, _ in named):
        raise ConfigError("--data: give every entry a NAME= (a mixture of sources) or none (one corpus)")
    sources: dict[str, dict] = {}
    for name, path, weight in named:
        source = sources.setdefault(name, {"name": name, "paths": []})
        source["paths"].append(path)
        if weight is not None:
            if source.get("weight") not in (None, weight):
                raise ConfigError(f"--data: source {name} is given two weights")
            source["weight"] = weight
    return [p for s in sources.values() for p in s["paths"]], list(sources.values())


def data_overrides(entries: list[str] | None) -> dict:
    """What `train --data ...` says about the run config: the paths, and the sources (none for
    plain paths), replacing a config file's."""
    if not entries:
        return {}
    paths, sources = parse_data_args(entries)
    return {"data_paths": paths, "data": {"sources": sources or []}}


def _split(entry: str) -> tuple[str | None, str, float | None]:
    head, eq, rest = entry.partition("=")
    if not eq or "/" in head or ":" in head or not NAME.match(head):
        return None, entry, None
    path, colon, tail = rest.rpartition(":")
    if colon:
        try:
            weight = float(tail)
        except ValueError:
            return head, rest, None  # the colon is the path's own (a URL scheme)
        if not (0 < weight < float("inf")):
            raise ConfigError(f"--data {entry}: the weight must be a positive number")
        return head, path, weight
    return head, rest, None


def source_shards(cfg) -> dict[str, list[str]] | None:
    """Each source's shards (a mixture), or None (one corpus). A shard in two sources is refused:
    its samples would have two epoch counters."""
    if not cfg.data.sources:
        return None
    from pipelines.shards import expand_shards

    by_source, owner = {}, {}
    for source in cfg.data.sources:
        by_source[source.name] = expand_shards(list(source.paths), cfg.storage_options)
        for shard in by_source[source.name]:
            if owner.setdefault(shard, source.name) != source.name:
                raise ConfigError(f"{shard} is in data sources {owner[shard]} and {source.name}")
    return by_source


def plan_mixture(cfg, by_source: dict[str, list[str]], counts: dict[str, int]):
    """The run's pipelines.mixture.Mixture from its sources' shards and samples per shard."""
    from pipelines.mixture import Mixture

    specs = [(s.name, {shard: counts.get(shard, 0) for shard in by_source[s.name]}, s.weight, s.repeat)
             for s in cfg.data.sources]
    return Mixture.plan(specs, cfg.train.samples_per_epoch, cfg.seed)


def record_counts(shards: list[str], data: DataConfig, storage_options: dict | None) -> dict[str, int]:
    """Records per raw shard (what a mixture's sample positions count), by reading them all in
    one Ray Data job: raw shards have no manifest to say it."""
    from pipelines.datasource import read_webdataset
    from pipelines.tarheaders import ReadLimits

    ds = read_webdataset(shards, storage_options=storage_options, limits=ReadLimits.from_config(data),
                         include_errors=True).select_columns(["source"])
    counts = {row["source"]: row["count()"] for row in ds.groupby("source").count().take_all()}
    return {shard: counts.get(shard, 0) for shard in shards}
