"""Crash containment: a shard whose task's process dies on every attempt is retried a bounded
number of times, then quarantined whole as `shard_crashed`; the job finishes (exit 0) and its
good shards come out exactly once, including one whose first attempt died.

The crash is real: the worker process SIGKILLs itself while opening the shard, as an OOM kill
or a decoder's segfault ends it, and Ray sees a dead worker. It comes from a test-only fsspec
filesystem, `crashtest://` (local files; opening a file whose name says `crash-always`, or
`crash-once` the first time, kills the opener), plugged in with fsspec's own plugin mechanism:
an `fsspec.specs` entry point in a dist-info folder on the PYTHONPATH of the CLI. The CLI starts
its own embedded Ray (no RAY_ADDRESS), whose workers inherit that PYTHONPATH, so every process
of the job knows the protocol and nothing test-only touches the product's code path. Why not
the session's cluster: its workers started without the plugin on their path.
"""
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pyarrow.parquet as pq

from conftest import ROOT
from pipelines import reasons
from pipelines.corpus import make_corpus

PLUGIN = '''
"""A local filesystem whose opens kill the opening process, for crash tests."""
import os
import signal

from fsspec.implementations.local import LocalFileSystem


class CrashingFileSystem(LocalFileSystem):
    protocol = ("crashtest",)

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        name = os.path.basename(path)
        if "crash-" in name and "r" in mode:
            with open(path + ".attempts", "a") as f:  # one line per process that opened it
                f.write(f"{os.getpid()}\\n")
            first = not os.path.exists(path + ".crashed")
            if "crash-always" in name or ("crash-once" in name and first):
                open(path + ".crashed", "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return super()._open(path, mode, **kwargs)
'''


def install_plugin(folder):
    folder.mkdir()
    (folder / "crashtestfs.py").write_text(textwrap.dedent(PLUGIN))
    info = folder / "crashtestfs-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crashtestfs\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fsspec.specs]\ncrashtest = crashtestfs:CrashingFileSystem\n")
    return folder


def test_a_shard_that_kills_its_worker_is_quarantined_after_bounded_retries(tmp_path):
    corpus = tmp_path / "raw"
    make_corpus(str(corpus), 12, 3, seed=21)
    names = ["a-crash-always.tar", "b-crash-once.tar", "c.tar"]
    keys = {}
    for i, name in enumerate(names):
        src = corpus / f"shard-{i:06d}.tar"
        with tarfile.open(src) as t:
            keys[name] = sorted({m.name.split(".", 1)[0] for m in t.getmembers()})
        src.rename(corpus / name)
    plugin = install_plugin(tmp_path / "plugin")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(plugin)])
    out = tmp_path / "out"

    result = subprocess.run(
        [sys.executable, str(ROOT / "ray_job.py"), "preprocess", f"crashtest://{corpus}", "--output", str(out),
         "--quiet", "--workers", "2", "--shard-retries", "1"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    always, once, good = (f"crashtest://{corpus}/{n}" for n in names)
    # bounded: the always-crashing shard was opened by 1 + 1 retry = 2 processes, no more
    assert len((corpus / "a-crash-always.tar.attempts").read_text().split()) == 2
    # the crash-once shard died once and its retry went through
    assert len((corpus / "b-crash-once.tar.attempts").read_text().split()) == 2

    quarantine = pq.read_table(out / "_quarantine.parquet").to_pylist()
    assert len(quarantine) == 1
    row = quarantine[0]
    assert (row["key"], row["source"], row["reason"], row["kind"]) == ("", always, reasons.SHARD_CRASHED,
                                                                       reasons.ERROR)
    assert "Error" in row["detail"] and "died 2 times" in row["detail"] and "\n" not in row["detail"]

    # the good neighbours, and the shard whose first attempt died, come out exactly once
    manifest = pq.read_table(out / "_manifest.parquet").to_pylist()
    got = sorted((r["source"], r["key"]) for r in manifest)
    assert got == sorted([(once, k) for k in keys[names[1]]] + [(good, k) for k in keys[names[2]]])
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["crashed_shards"] == 1 and stats["quarantined"] == {reasons.SHARD_CRASHED: 1}
    assert stats["read"] == stats["written"] + len(quarantine) == 9
    done = json.loads((out / "_parts" / "shard-000000.done.json").read_text())
    assert done["crashed"] == row["detail"]
    with tarfile.open(out / "shard-000000.tar") as t:
        assert t.getmembers() == []  # output shard i exists for every input shard i
    assert "crashed     1 shard(s)" in result.stdout
    assert not [n for n in os.listdir(out) + os.listdir(out / "_parts") if ".tmp-" in n]


BATCHED = '''
import sys
from pipelines.runtime import local_mode_env
local_mode_env()
from pipelines.preprocess import preprocess
preprocess([sys.argv[1]], sys.argv[2], workers=1, shards_per_task=4, shard_retries=1, progress=False)
'''


def test_a_crash_in_a_task_of_several_shards_costs_only_the_shard_it_died_on(tmp_path):
    """Four shards in one task: the shard it dies on gets exactly 1 + retries attempts in all,
    the shards before it are not run again, those after it are run once each."""
    corpus = tmp_path / "raw"
    make_corpus(str(corpus), 16, 4, seed=22)
    names = ["a-crash-never.tar", "b-crash-always.tar", "c-crash-once.tar", "d-crash-never.tar"]
    for i, name in enumerate(names):
        (corpus / f"shard-{i:06d}.tar").rename(corpus / name)
    plugin = install_plugin(tmp_path / "plugin")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(plugin)])
    out = tmp_path / "out"

    result = subprocess.run([sys.executable, "-c", BATCHED, f"crashtest://{corpus}", str(out)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    opened = {n: len((corpus / f"{n}.attempts").read_text().split()) for n in names}
    assert opened == {names[0]: 1, names[1]: 2, names[2]: 2, names[3]: 1}
    quarantine = pq.read_table(out / "_quarantine.parquet").to_pylist()
    assert [(r["source"], r["reason"]) for r in quarantine] == [(f"crashtest://{corpus}/{names[1]}",
                                                               reasons.SHARD_CRASHED)]
    assert "died 2 times" in quarantine[0]["detail"]
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["crashed_shards"] == 1 and stats["written"] == 12 and stats["shards"] == 4
