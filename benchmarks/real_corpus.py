"""A corpus of real photographs with spoken captions, as WebDataset tar shards: what
`benchmarks/preprocess.py --corpus real` measures (synthetic noise images are not what users feed).

Photos: the sample photographs scikit-learn ships (`load_sample_images()`: china.jpg,
flower.jpg) and matplotlib's `grace_hopper.jpg`. Each sample is a random box of one photo
(aspect 0.6-1.7, 30-100% of the area), resized so its shorter side is 96-640 px (one in ten
1000-2000 px, a phone photo's size) and stored as
  JPEG  quality 60-95, 4:2:0 or 4:4:4, a fifth progressive, some with an EXIF orientation tag;
  PNG   RGB, RGBA (opaque alpha, as screenshots and exports have it), L or a 256-colour palette;
  WebP  lossy (quality 50-90) or lossless.
Captions: a sentence naming what the photo shows, as .txt or .json {"caption": ...}.
Speech: the caption spoken by espeak-ng (Debian's `espeak-ng`; 8 English voices, 130-200 words
per minute), resampled to 8, 16, 22.05, 44.1 or 48 kHz, mono or stereo (the right channel a
little quieter and later), stored as WAV, FLAC, OGG Vorbis or MP3 through soundfile. Where
espeak-ng is missing, a speech-like synthetic signal (`pipelines.corpus_samples.render_audio`)
stands in and `_corpus.json` says so ("speech": "synthetic ...").

Everything is a pure function of (seed, index): sample i's choices come from
`default_rng([seed, i])`. Spoken clips come from a pool of `SPEECH_POOL` utterances (a
subprocess each); the samples draw from it. Shards are named and described as
`pipelines.corpus.make_corpus` does (`shard-NNNNNN.tar`, `_corpus.json`).

    python benchmarks/real_corpus.py OUT --samples 2000 --shards 20
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

MTIME = 1_700_000_000  # fixed: the same seed gives the same tar bytes
SPEECH_POOL = 256
RATES = (8000, 16000, 22050, 44100, 48000)
AUDIO_FORMATS = (("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"),
                 ("mp3", "MP3", "MPEG_LAYER_III"))
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f3", "en-gb+f4", "en-us+m5")
# what each photo shows, for the captions
SUBJECTS = {"china": "a Chinese temple roof among green trees", "flower": "a pink flower in a garden",
            "grace_hopper": "a woman in a navy uniform"}
_TEMPLATES = ("A photo of {s}.", "Here you can see {s}, photographed in daylight.",
              "A close-up picture showing {s}.", "This image shows {s} from a slight angle.",
              "{S}, cropped from a larger photograph.", "A snapshot of {s}, number {n}.")


def source_photos() -> dict[str, Image.Image]:
    """The photographs, RGB, by name (scikit-learn's only where it is installed)."""
    import matplotlib

    photos = {}
    try:
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
        for name, arr in zip(data.filenames, data.images):
            photos[os.path.splitext(os.path.basename(name))[0]] = Image.fromarray(arr).convert("RGB")
    except ImportError:
        pass  # matplotlib's photo alone still makes a corpus
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    with Image.open(path) as im:
        photos["grace_hopper"] = im.convert("RGB")
    return photos


def sources_now() -> dict:
    """What a corpus made now would be made from (as `_corpus.json` records it)."""
    return {"photos": sorted(source_photos()), "speech": speech_label(espeak())}


def drop_if_made_otherwise(path: str, allow_stand_ins: bool) -> None:
    """Stop (SystemExit, one line) where the real corpus would be made of stand-ins, unless
    allowed; delete a corpus at `path` made from other photos or speech than a new one would
    be: it measures other work."""
    now = sources_now()
    if (now["photos"] != sorted(SUBJECTS) or not now["speech"].startswith("espeak-ng")) and not allow_stand_ins:
        raise SystemExit(f"the real corpus would have photos {now['photos']} and speech {now['speech']!r}: install "
                         "scikit-learn (pip install -e .[bench]) and Debian's espeak-ng, or pass --allow-stand-ins")
    try:
        with open(os.path.join(path, "_corpus.json")) as f:
            kept = json.load(f)
    except FileNotFoundError:
        return
    if {k: kept.get(k) for k in now} != now:
        print(f"[bench] {path} was made from photos {kept.get('photos')} and speech {kept.get('speech')!r}; "
              f"making it again from {now['photos']} and {now['speech']!r}", flush=True)
        shutil.rmtree(path)


def speech_label(exe: str | None) -> str:
    return f"espeak-ng ({exe})" if exe else "synthetic (espeak-ng not found)"


def espeak() -> str | None:
    return shutil.which("espeak-ng")


def _caption(rng: np.random.Generator, photo: str, index: int) -> str:
    s = SUBJECTS.get(photo, "a photograph")
    return str(rng.choice(_TEMPLATES)).format(s=s, S=s[0].upper() + s[1:], n=index)


def speak(text: str, voice: str, wpm: int, exe: str | None) -> tuple[np.ndarray, int]:
    """float32 mono speech and its rate: espeak-ng's, else the synthetic stand-in."""
    import soundfile as sf

    if exe:
        wav = subprocess.run([exe, "-v", voice, "-s", str(wpm), "--stdout", text], check=True,
                             capture_output=True, timeout=60).stdout
        x, sr = sf.read(io.BytesIO(wav), dtype="float32")
        return x.reshape(len(x), -1).mean(axis=1), sr
    from pipelines import corpus_samples as C

    rng = np.random.default_rng([zlib.crc32(f"{voice} {wpm} {text}".encode())])
    seconds = 0.4 + 0.065 * len(text) * 160 / wpm
    x = C.render_audio(rng, C.subject(len(text) % 16), 22050, seconds, 1)
    return np.asarray(x, dtype=np.float32).reshape(-1), 22050


def _speech_pool(seed: int, n: int, photos: list[str], exe: str | None) -> list[tuple[str, str, np.ndarray, int]]:
    """n spoken captions: (photo, caption, wave, rate)."""
    def one(j: int):
        rng = np.random.default_rng([seed, 1, j])
        photo = photos[j % len(photos)]
        text = _caption(rng, photo, j)
        wave, sr = speak(text, str(rng.choice(VOICES)), int(rng.integers(130, 201)), exe)
        return photo, text, wave, sr

    with ThreadPoolExecutor(max_workers=4) as pool:  # espeak-ng runs in its own process
        return list(pool.map(one, range(n)))


def _image_member(rng: np.random.Generator, photo: Image.Image) -> tuple[str, bytes]:
    w, h = photo.size
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
    area = rng.uniform(0.3, 1.0) * w * h
    cw, ch = min(w, int(round((area * aspect) ** 0.5))), min(h, int(round((area / aspect) ** 0.5)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    short = int(rng.integers(1000, 2001)) if rng.random() < 0.1 else int(rng.integers(96, 641))
    scale = short / min(cw, ch)
    img = photo.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.LANCZOS,
                       box=(x0, y0, x0 + cw, y0 + ch))
    buf, kind = io.BytesIO(), rng.choice(["jpg", "jpg", "jpg", "png", "webp"])
    if kind == "jpg":
        kw = {"quality": int(rng.integers(60, 96)), "subsampling": int(rng.choice([0, 2])),
              "progressive": bool(rng.random() < 0.2)}
        if rng.random() < 0.15:
            exif = Image.Exif()
            exif[0x0112] = int(rng.integers(2, 9))  # orientation: displayed turned or mirrored
            kw["exif"] = exif.tobytes()
        img.save(buf, "JPEG", **kw)
    elif kind == "png":
        mode = rng.choice(["RGB", "RGBA", "L", "P"])
        if mode == "RGBA":
            img = img.copy()
            img.putalpha(255)
        elif mode == "L":
            img = img.convert("L")
        elif mode == "P":
            img = img.quantize(256)
        img.save(buf, "PNG")
    else:
        if rng.random() < 0.25:
            img.save(buf, "WEBP", lossless=True, quality=50)
        else:
            img.save(buf, "WEBP", quality=int(rng.integers(50, 91)))
    return str(kind), buf.getvalue()


def _audio_member(rng: np.random.Generator, wave: np.ndarray, sr: int) -> tuple[str, bytes]:
    import soundfile as sf
    import soxr

    rate = int(rng.choice(RATES))
    x = soxr.resample(wave, sr, rate) if rate != sr else wave
    if rng.random() < 0.35:
        delay = int(rate * 0.0005)
        right = 0.8 * np.concatenate([np.zeros(delay, np.float32), x[:len(x) - delay]])
        x = np.stack([x, right], axis=1)
    ext, fmt, subtype = AUDIO_FORMATS[int(rng.integers(len(AUDIO_FORMATS)))]
    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1, 1).astype(np.float32), rate, format=fmt, subtype=subtype)
    return ext, buf.getvalue()


def render_sample(seed: int, index: int, photos: dict[str, Image.Image], pool: list) -> list[tuple[str, bytes]]:
    """The tar members (name, bytes) of sample `index`."""
    rng = np.random.default_rng([seed, 0, index])
    photo, text, wave, sr = pool[int(rng.integers(len(pool)))]
    key = f"r{index:07d}"
    iext, image = _image_member(rng, photos[photo])
    aext, audio = _audio_member(rng, wave, sr)
    if rng.random() < 0.3:
        text_member = ("json", json.dumps({"caption": text, "photo": photo}).encode())
    else:
        text_member = ("txt", text.encode())
    return [(f"{key}.{iext}", image), (f"{key}.{text_member[0]}", text_member[1]), (f"{key}.{aext}", audio)]


def make_real_corpus(out: str, samples: int, shards: int, *, seed: int = 0, progress: bool = False) -> dict:
    """`samples` samples over `shards` tars under the local folder `out`; returns `_corpus.json`'s content."""
    os.makedirs(out, exist_ok=True)
    photos, exe = source_photos(), espeak()
    pool = _speech_pool(seed, min(SPEECH_POOL, max(1, samples)), sorted(photos), exe)
    names = [f"shard-{i:06d}.tar" for i in range(shards)]
    ranges = [range(i * samples // shards, (i + 1) * samples // shards) for i in range(shards)]
    with ThreadPoolExecutor(max_workers=2) as ex:  # the encoders release the GIL
        for s, (name, r) in enumerate(zip(names, ranges)):
            tmp = os.path.join(out, name + ".tmp")
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for members in ex.map(lambda i: render_sample(seed, i, photos, pool), r):
                    for member, data in members:
                        info = tarfile.TarInfo(member)
                        info.size, info.mtime, info.mode = len(data), MTIME, 0o644
                        tar.addfile(info, io.BytesIO(data))
            os.replace(tmp, os.path.join(out, name))
            if progress and (s + 1) % max(1, shards // 10) == 0:
                print(f"[real corpus] {s + 1}/{shards} shards", flush=True)
    meta = {"kind": "real", "samples": samples, "shards": names, "seed": seed, "photos": sorted(photos),
            "speech": speech_label(exe),
            "shard_samples": {n: len(r) for n, r in zip(names, ranges)}, "good_total": samples}
    with open(os.path.join(out, "_corpus.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    meta = make_real_corpus(a.out, a.samples, a.shards, seed=a.seed, progress=True)
    print(f"wrote {meta['samples']} samples in {len(meta['shards'])} shards to {a.out}; speech: {meta['speech']}")


if __name__ == "__main__":
    main()
