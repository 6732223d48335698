"""The audio and caption stages on spoken captions, A/B: the previous implementation
(tests/reference_audio.py, kept verbatim) against pipelines/audio.py, in thread-CPU
microseconds per sample, per format and source rate.

The corpus is real speech: captions spoken by espeak-ng (22.05 kHz mono), resampled to 8, 16,
22.05, 44.1 and 48 kHz, half of them made stereo (the second channel delayed and quieter), and
encoded as WAV (16-bit), FLAC, Ogg Vorbis and MP3 by libsndfile: 1-10 s clips. Each sample goes
through what `transform.py` does with it, under the same stage marks (audio_decode, resample,
log_mel; fit_length is bookkeeping there and `fit` here). Both implementations run in this one
process, alternating in each round and each cell, on the same bytes; the table shows medians
over rounds of each cell's mean. The log-mel of both is compared (max |difference| in log10
units, over all bins and over the bins the model sees: at or above the clip's peak - 8).

    python benchmarks/audio_stages.py                   # 5 rounds x 20 cells x 8 clips: ~3 min
    python benchmarks/audio_stages.py --rounds 9 --clips 8 --out bench_out/audio_stages.json
    python benchmarks/audio_stages.py --imports         # also: import cost of scipy.fft, torch (~1 min)

Needs espeak-ng (Debian package `espeak-ng`).
"""
from __future__ import annotations

import harness  # noqa: F401  (first: one BLAS thread)

harness.single_threaded()

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import soxr  # noqa: E402

sys.path.insert(0, harness.ROOT)

from pipelines import audio as new_audio  # noqa: E402
from pipelines import captions  # noqa: E402
from pipelines.config import AudioConfig, TextConfig  # noqa: E402
from pipelines.stage_clock import StageClock, stage  # noqa: E402
from tests import reference_audio as ref_audio  # noqa: E402

CAPTIONS = [
    "A dog.",
    "Two children play on the beach.",
    "A red bus stops in front of the old station.",
    "Steam rises from a cup of coffee on a wooden table.",
    "A cyclist in a yellow jacket rides along a wet city street at dusk.",
    "Three people hike up a rocky trail under a clear blue sky, carrying heavy packs.",
    "A brown dog runs across the grassy field chasing a red ball while children watch from a bench.",
    "The old man sits on a wooden chair reading a newspaper in the afternoon sun, "
    "a cup of coffee beside him and a cat asleep at his feet.",
]
VOICES = [("en-us", 175), ("en", 150), ("en-gb-x-rp", 190), ("en-us", 140)]
RATES = (8000, 16000, 22050, 44100, 48000)
FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"),
           "mp3": ("MP3", "MPEG_LAYER_III")}
STAGES = ("audio_decode", "resample", "fit", "log_mel")


def speak(text: str, voice: str, speed: int) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", path, text], check=True)
        wave, rate = sf.read(path, dtype="float32")
    return wave, rate


def encode(wave: np.ndarray, rate: int, to_rate: int, channels: int, ext: str) -> bytes:
    x = soxr.resample(wave, rate, to_rate) if to_rate != rate else wave
    x = x / max(1.0, float(np.abs(x).max()) / 0.99)
    if channels == 2:  # a second microphone: 0.7 ms later, quieter
        d = int(to_rate * 0.0007)
        x = np.stack([x, 0.8 * np.concatenate([np.zeros(d, np.float32), x[:len(x) - d]])], axis=1)
    buf = io.BytesIO()
    fmt, subtype = FORMATS[ext]
    sf.write(buf, x, to_rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def make_corpus(clips: int) -> dict[str, list[bytes]]:
    """cell "ext@rate" -> `clips` encoded clips (spoken captions, voices and speeds varied;
    every other clip stereo)."""
    spoken = [speak(CAPTIONS[i % len(CAPTIONS)], *VOICES[i % len(VOICES)]) for i in range(clips)]
    return {f"{ext}@{rate}": [encode(w, r, rate, 1 + i % 2, ext) for i, (w, r) in enumerate(spoken)]
            for ext in FORMATS for rate in RATES}


def one_sample(mod, ext: str, data: bytes, cfg: AudioConfig) -> tuple[dict[str, int], np.ndarray]:
    """CPU ns per stage of one sample through `mod` (transform.py's calls and marks)."""
    with StageClock() as clock:
        with stage("audio_decode"):
            wave, _ = mod.decode_audio(data, ext, cfg)
        t0 = time.thread_time_ns()
        wave, valid = mod.fit_length(wave, cfg)
        fit = time.thread_time_ns() - t0
        with stage("log_mel"):
            mel = mod.log_mel(wave, cfg)
    ns = clock.ns
    return {"audio_decode": ns["audio_decode"], "resample": ns["resample"], "fit": fit, "log_mel": ns["log_mel"]}, mel


def mel_differences(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """max |a - b| over all bins, and over the bins at or above a's peak - 8 (what the model's
    Whisper scaling keeps)."""
    diff = np.abs(a.astype(np.float64) - b)
    seen = a >= a.max() - 8.0
    return float(diff.max()), float(diff[seen].max())


def measure(corpus: dict[str, list[bytes]], rounds: int) -> dict:
    cfg = AudioConfig()
    impls = {"before": ref_audio, "after": new_audio}
    per = {cell: {k: {s: [] for s in STAGES} for k in impls} for cell in corpus}
    worst = {cell: [0.0, 0.0] for cell in corpus}
    for rnd in range(rounds):
        order = list(impls) if rnd % 2 == 0 else list(impls)[::-1]
        for cell, clips in corpus.items():
            ext = cell.split("@")[0]
            sums = {k: dict.fromkeys(STAGES, 0) for k in impls}
            for data in clips:
                mels = {}
                for k in order:
                    ns, mels[k] = one_sample(impls[k], ext, data, cfg)
                    for s in STAGES:
                        sums[k][s] += ns[s]
                if rnd == 0:
                    d = mel_differences(mels["before"], mels["after"])
                    worst[cell] = [max(worst[cell][0], d[0]), max(worst[cell][1], d[1])]
            for k in impls:
                for s in STAGES:
                    per[cell][k][s].append(sums[k][s] / len(clips) / 1e3)
        print(f"[audio_stages] round {rnd + 1}/{rounds} done", flush=True)
    us = {cell: {k: {s: round(statistics.median(v), 1) for s, v in st.items()} for k, st in d.items()}
          for cell, d in per.items()}
    return {"us_per_sample": us, "mel_max_abs_diff": {c: {"all": w[0], "model_range": w[1]} for c, w in worst.items()}}


def measure_text(rounds: int) -> dict:
    """decode_text on the captions as .txt and .json members, µs per caption."""
    cfg = TextConfig()
    members = [(c.encode(), "txt") for c in CAPTIONS] + [(json.dumps({"caption": c}).encode(), "json") for c in CAPTIONS]
    per_round = []
    for _ in range(rounds):
        t0 = time.thread_time_ns()
        for _ in range(200):
            for data, ext in members:
                captions.decode_text(data, ext, cfg)
        per_round.append((time.thread_time_ns() - t0) / (200 * len(members)) / 1e3)
    return {"text_us_per_caption": round(statistics.median(per_round), 2)}


IMPORT_PROBE = ("import time; t = time.process_time(); import {mods}; cpu = time.process_time() - t; "
                "rss = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmRSS')][0]; "
                "print(cpu, rss)")


def import_costs(repeats: int = 5) -> dict:
    """CPU seconds and resident MB of a fresh interpreter after importing what the audio stage
    needs, and that plus scipy.fft or torch: what each FFT choice costs every Ray worker once."""
    out = {}
    for name, mods in (("base", "numpy, soundfile, soxr"), ("scipy.fft", "numpy, soundfile, soxr, scipy.fft"),
                       ("torch", "numpy, soundfile, soxr, torch")):
        runs = []
        for _ in range(repeats):
            line = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(mods=mods)], check=True,
                                  capture_output=True, text=True, env=harness.child_env()).stdout.split()
            runs.append((float(line[0]), int(line[1]) / 1024))
        out[name] = {"cpu_s": round(statistics.median(r[0] for r in runs), 3),
                     "rss_mb": round(statistics.median(r[1] for r in runs), 1)}
    return out


def render(results: dict, part: str = "") -> str:
    rows = ["| cell | " + " | ".join(f"{s} before / after" for s in STAGES) + " | total before / after | "
            "mel max diff (all / model range) |", "|---" * (len(STAGES) + 3) + "|"]
    for cell, d in results["us_per_sample"].items():
        b, a = d["before"], d["after"]
        cols = [f"{b[s]:.0f} / {a[s]:.0f}" for s in STAGES]
        tb, ta = sum(b.values()), sum(a.values())
        m = results["mel_max_abs_diff"][cell]
        rows.append(f"| {cell} | " + " | ".join(cols) + f" | {tb:.0f} / {ta:.0f} ({tb / ta:.2f}x) | "
                    f"{m['all']:.2g} / {m['model_range']:.2g} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clips", type=int, default=8, help="clips per format x rate cell")
    ap.add_argument("--imports", action="store_true", help="also measure import costs")
    ap.add_argument("--out", default=os.path.join(harness.ROOT, "bench_out", "audio_stages.json"))
    args = ap.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    t0 = time.time()
    corpus = make_corpus(args.clips)
    results = {"rounds": args.rounds, "clips_per_cell": args.clips, "load_before": os.getloadavg()[0],
               **measure(corpus, args.rounds), **measure_text(args.rounds)}
    if args.imports:
        results["imports"] = import_costs()
    results["load_after"] = os.getloadavg()[0]
    results["wall_s"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(render(results))
    print({k: v for k, v in results.items() if k not in ("us_per_sample", "mel_max_abs_diff")})


if __name__ == "__main__":
    main()
