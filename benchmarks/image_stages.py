"""Image stages' CPU per image, today's code (tests/reference_images.py) against
`pipelines.images`, on real photographs, in one process, alternating.

Photos: matplotlib's grace_hopper.jpg, plus scikit-learn's china.jpg and flower.jpg where
scikit-learn is installed; each resized (Lanczos) to a long side of 128-2000 px and encoded as
JPEG q90 (RGB, grey), PNG (RGB, RGBA with a gradient alpha, palette) and WebP q90. A round
runs every variant through both implementations (decode_image, then encode_jpeg of the crop,
q95) under the stage clock: image_decode, resize, encode in thread-CPU us, medians of the
rounds, grouped by format and size (<= 640 px: small, larger: large). It also prints the crop's
and the stored JPEG's largest mean absolute difference between the two per group.

    python benchmarks/image_stages.py --rounds 5     # ~3 min on a quiet core (5 min for 3 at load 34)
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import statistics
import sys

import harness

harness.single_threaded()
sys.path[:0] = [harness.ROOT, os.path.join(harness.ROOT, "tests")]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import reference_images as before  # noqa: E402
from pipelines import images as now  # noqa: E402
from pipelines.config import ImageConfig  # noqa: E402
from pipelines.stage_clock import StageClock, stage  # noqa: E402

SIDES = (128, 256, 480, 640, 1280, 2000)


def photos() -> list[Image.Image]:
    from matplotlib import cbook
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        out = [Image.open(f).convert("RGB")]
    try:  # not a dependency of the product: used where installed
        from sklearn.datasets import load_sample_images
        out += [Image.fromarray(a) for a in load_sample_images().images]
    except ImportError:
        pass
    return out


def variants() -> list[tuple[str, bytes]]:
    out = []
    for photo in photos():
        for side in SIDES:
            w, h = photo.size
            img = photo.resize((round(w * side / max(w, h)), round(h * side / max(w, h))), Image.Resampling.LANCZOS)
            rgba = img.convert("RGBA")
            rgba.putalpha(Image.linear_gradient("L").resize(img.size))
            for name, im, fmt in (("JPEG-RGB", img, "JPEG"), ("JPEG-L", img.convert("L"), "JPEG"),
                                  ("PNG-RGB", img, "PNG"), ("PNG-RGBA", rgba, "PNG"),
                                  ("PNG-P", img.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
                                  ("WEBP-RGB", img, "WEBP")):
                buf = io.BytesIO()
                im.save(buf, fmt, **({} if fmt == "PNG" else {"quality": 90}))
                out.append((f"{name}-{'small' if side <= 640 else 'large'}", buf.getvalue()))
    return out


def run(module, data: bytes, cfg: ImageConfig):
    with StageClock() as clock:
        with stage("image_decode"):
            crop, _ = module.decode_image(data, "", cfg)
        with stage("encode"):
            jpeg = module.encode_jpeg(crop, cfg.jpeg_quality)
    s = clock.seconds()
    return crop, jpeg, [s["image_decode"] * 1e6, s["resize"] * 1e6, s["encode"] * 1e6]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    cfg, data = ImageConfig(), variants()
    times, diffs = collections.defaultdict(list), collections.defaultdict(lambda: [0.0, 0.0])
    for r in range(args.rounds):
        order = ((before, "before"), (now, "now")) if r % 2 == 0 else ((now, "now"), (before, "before"))
        for group, blob in data:
            out = {}
            for module, label in order:
                out[label] = run(module, blob, cfg)
                times[group, label].append(out[label][2])
            if r == 0:
                crop = np.abs(out["now"][0].astype(np.int16) - out["before"][0]).mean()
                jpeg = np.abs(now.decode_jpeg_rgb(out["now"][1]).astype(np.int16)
                              - now.decode_jpeg_rgb(out["before"][1])).mean()
                d = diffs[group]
                d[0], d[1] = max(d[0], crop), max(d[1], jpeg)
    print(f"load average {os.getloadavg()[0]:.1f}; us of thread CPU per image, medians of {args.rounds} rounds")
    print("| variant | before: decode / resize / encode | now: decode / resize / encode | total before -> now | "
          "max crop MAD | max JPEG MAD |")
    print("|---|---|---|---|---|---|")
    for group in sorted({g for g, _ in times}):
        b, n = ([statistics.median(x) for x in zip(*times[group, label])] for label in ("before", "now"))
        print(f"| {group} | {b[0]:.0f} / {b[1]:.0f} / {b[2]:.0f} | {n[0]:.0f} / {n[1]:.0f} / {n[2]:.0f} | "
              f"{sum(b):.0f} -> {sum(n):.0f} | {diffs[group][0]:.2f} | {diffs[group][1]:.2f} |")


if __name__ == "__main__":
    main()
