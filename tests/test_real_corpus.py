"""The real-photo + speech corpus of benchmarks/preprocess.py (benchmarks/real_corpus.py) writes
shards our reader and transform take whole: every sample read, none quarantined, each with an
image, a caption and audio; the same seed gives the same bytes. Without espeak-ng the speech is
a synthetic stand-in, and `_corpus.json` says which it is."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from pipelines.config import DataConfig
from pipelines.source import iter_tar_samples
from pipelines.transform import encode_members, transform_sample

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import real_corpus as R  # noqa: E402


def test_real_corpus_shards_go_through_our_transform(tmp_path) -> None:
    meta = R.make_real_corpus(str(tmp_path), samples=5, shards=2, seed=3)
    assert meta["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    assert json.loads((tmp_path / "_corpus.json").read_text()) == meta
    assert meta["speech"].startswith("espeak-ng" if R.espeak() else "synthetic (espeak-ng not found)")
    assert "grace_hopper" in meta["photos"]
    cfg = DataConfig()
    keys = []
    for name in meta["shards"]:
        n = 0
        for raw in iter_tar_samples(str(tmp_path / name)):
            p = transform_sample(raw, cfg)  # a SampleError here fails the test
            assert p.modalities == ["image", "text", "audio"], raw.members.keys()
            assert p.image.shape == (224, 224, 3) and p.image.std() > 5  # a photo, not a flat fill
            assert 0.5 < p.audio_seconds < 20 and p.mel_frames > 50
            assert set(encode_members(p, cfg)) >= {"jpg", "txt", "mel.npy", "json"}
            keys.append(raw.key)
            n += 1
        assert n == meta["shard_samples"][name]
    assert keys == [f"r{i:07d}" for i in range(5)]


def test_same_seed_same_bytes_and_the_speech_stand_in() -> None:
    photos = R.source_photos()
    wave, sr = R.speak("A photo of a pink flower.", "en-us", 160, None)  # the stand-in, always
    assert sr == 22050 and wave.dtype == np.float32 and 0.5 < len(wave) / sr < 10
    pool = [("grace_hopper", "A photo of a pink flower.", wave, sr)]  # matplotlib's: there without scikit-learn
    a, b = (R.render_sample(7, 11, photos, pool) for _ in range(2))
    assert a == b
    assert [name.split(".", 1)[0] for name, _ in a] == ["r0000011"] * 3
