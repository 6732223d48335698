#!/usr/bin/env python
"""The peer of `benchmarks/preprocess.py`: the preprocessing a competent user writes in an
afternoon with `webdataset` and a torch `DataLoader` (2 workers), none of our pipeline's code
but the caption normalization (text is cheap).

Per sample: the image opened with Pillow, turned upright (EXIF), converted to RGB, its shorter
side resized to 224 (bicubic) and center-cropped to 224 x 224 (what torchvision's
`Resize(224, BICUBIC)` + `CenterCrop(224)` do to a PIL image, written out: torchvision is not
installed here), saved as JPEG q90 4:4:4; the audio read with soundfile, mixed to mono,
resampled to 16 kHz with soxr (librosa's default resampler), padded or trimmed to 10 s, and
turned into a Whisper-style 80-bin log10-mel (`torch.stft`, float32; n_fft 512, 25 ms window,
10 ms hop, Slaney filterbank as `librosa.filters.mel` builds it), stored as float16 .npy; the
caption normalized. Output: `shard-NNNNNN.tar` written with `wds.TarWriter` in the main
process, one per input shard, members KEY.jpg, KEY.txt, KEY.mel.npy.

    python benchmarks/preprocess_peer.py INPUT_FOLDER OUTPUT_FOLDER [--workers 2]
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os

import numpy as np
import soundfile as sf
import soxr
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from pipelines.captions import decode_text
from pipelines.config import TextConfig

SIZE, QUALITY = 224, 90
RATE, SECONDS, N_FFT, WIN, HOP, N_MELS = 16000, 10.0, 512, 400, 160, 80


def image_224(data: bytes) -> bytes:
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = img.size
    if w <= h:  # torchvision's Resize(int): the shorter side to SIZE, the other truncated
        size = (SIZE, int(SIZE * h / w))
    else:
        size = (int(SIZE * w / h), SIZE)
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = int(round((size[0] - SIZE) / 2.0)), int(round((size[1] - SIZE) / 2.0))
    img = img.crop((left, top, left + SIZE, top + SIZE))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=QUALITY, subsampling=0)
    return buf.getvalue()


def slaney_mel_filters(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels) (htk=False, norm="slaney")."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0

    def hz_to_mel(f):
        return f / f_sp if f < min_log_hz else min_log_mel + np.log(f / min_log_hz) / logstep

    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2.0), n_mels + 2)
    hz = np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)
    fftfreqs = np.linspace(0, sr / 2.0, 1 + n_fft // 2)
    fdiff, ramps = np.diff(hz), hz[:, None] - fftfreqs[None, :]
    weights = np.maximum(0, np.minimum(-ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]))
    weights *= (2.0 / (hz[2:n_mels + 2] - hz[:n_mels]))[:, None]
    return weights.astype(np.float32)


MEL = torch.from_numpy(slaney_mel_filters(RATE, N_FFT, N_MELS))
WINDOW = torch.hann_window(WIN)


def log_mel_npy(data: bytes) -> bytes:
    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if sr != RATE:
        wave = soxr.resample(wave, sr, RATE)
    n = int(RATE * SECONDS)
    wave = np.pad(wave[:n], (0, max(0, n - len(wave))))
    spec = torch.stft(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), N_FFT, HOP, WIN, WINDOW,
                      center=True, pad_mode="reflect", return_complex=True)
    mel = torch.log10(torch.clamp(MEL @ spec.abs() ** 2, min=1e-10))
    buf = io.BytesIO()
    np.save(buf, mel.numpy().astype(np.float16))
    return buf.getvalue()


def process(sample: dict) -> dict:
    out = {"__key__": sample["__key__"], "__url__": sample["__url__"]}
    for ext, data in sample.items():
        if ext in ("jpg", "jpeg", "png", "webp"):
            out["jpg"] = image_224(data)
        elif ext in ("wav", "flac", "ogg", "mp3"):
            out["mel.npy"] = log_mel_npy(data)
        elif ext in ("txt", "json"):
            out["txt"] = decode_text(data, ext, TextConfig()).encode()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    urls = sorted(glob.glob(os.path.join(args.input, "*.tar")))
    os.makedirs(args.output, exist_ok=True)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(process)
    loader = DataLoader(ds, batch_size=None, num_workers=args.workers, prefetch_factor=4)
    writers, n = {}, 0
    for s in loader:
        url = s.pop("__url__")
        if url not in writers:
            name = os.path.join(args.output, f"shard-{len(writers):06d}.tar")
            writers[url] = wds.TarWriter(name, encoder=False, mtime=0)
        writers[url].write(s)
        n += 1
    for w in writers.values():
        w.close()
    print(json.dumps({"written": n}))


if __name__ == "__main__":
    main()
