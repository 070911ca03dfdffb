"""One PNG grid of rendered images with each caption under its image.

    python -m tools.contact_sheet --model OUT/default --upscaler OUT/default-x4 \\
        --prompts examples/prompts.jsonl --out docs/example.png  # render, then lay out
    python -m tools.contact_sheet --rendered RENDER_DIR --out sheet.png   # lay out finished shards

A rendered folder holds `shard-NNNNN.tar` shards of `<key>.png` (or .jpg, .webp) + `<key>.json`
with a "prompt" field, as `jaxdiff render` writes them (key: shard and record number, so the
sheet is in manifest order; `--keep-base`'s `<key>.base.png` images are left out).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tarfile
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def read_rendered(folder: str, limit: int) -> list[tuple[np.ndarray, str]]:
    """(image, caption) pairs from the shards of a rendered output folder, in key (manifest) order."""
    shards = sorted(glob.glob(os.path.join(folder, "*.tar")))
    if not shards:
        raise FileNotFoundError(f"{folder}: no *.tar shards; pass the output folder of `jaxdiff render`")
    items: dict[str, dict] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                stem, ext = os.path.splitext(member.name)
                data = tar.extractfile(member)
                if data is None or stem.endswith(".base"):  # --keep-base's image before the x4 stage
                    continue
                if ext in (".png", ".jpg", ".jpeg", ".webp"):
                    items.setdefault(stem, {})["image"] = np.asarray(Image.open(io.BytesIO(data.read())).convert("RGB"))
                elif ext == ".json":
                    items.setdefault(stem, {})["caption"] = json.loads(data.read()).get("prompt", stem)
    pairs = [(v["image"], v.get("caption", k)) for k, v in sorted(items.items()) if "image" in v]
    return pairs[:limit]


def contact_sheet(pairs: list[tuple[np.ndarray, str]], columns: int = 4, cell: int = 256) -> Image.Image:
    """Images scaled to `cell` pixels, `columns` to a row, each caption wrapped below its image."""
    if not pairs:
        raise ValueError("no images to lay out")
    font = ImageFont.load_default()
    chars = max(8, cell // 6)
    wrapped = [textwrap.wrap(caption, chars) or [""] for _, caption in pairs]
    line_h = 12
    text_h = line_h * max(len(w) for w in wrapped) + 6
    rows = -(-len(pairs) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_h)), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for i, ((image, _), lines) in enumerate(zip(pairs, wrapped)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        sheet.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            pen.text((x + 3, y + cell + 3 + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.contact_sheet", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--rendered", help="an output folder of `jaxdiff render` (tar shards)")
    source.add_argument("--prompts", help="a manifest (JSONL, CSV, Parquet or one prompt a line), rendered here")
    parser.add_argument("--model", help="base model folder (with --prompts; default: the shipped model)")
    parser.add_argument("--upscaler", default=None, help="x4 upscaler folder (with --prompts)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--cell", type=int, default=256, help="pixel side of each image on the sheet")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rendered:
        pairs = read_rendered(args.rendered, args.limit)
    else:
        import jaxdiff
        from pipelines import manifest

        # Read as `jaxdiff render` reads it: ids, seeds and per-record options kept.
        defaults = manifest.RenderDefaults(seed=args.seed)
        samples = []
        for spec in manifest.plan_shards(manifest.expand_patterns([args.prompts]), 1000):
            for raw in manifest.read_shard(spec):
                made = manifest.to_samples(raw, defaults)
                samples += made if isinstance(made, list) else []
        samples = samples[: args.limit]
        if not samples:
            parser.error(f"--prompts {args.prompts}: the manifest has no valid records")
        pipe = jaxdiff.load_pipeline(args.model, upscaler=args.upscaler)
        results = pipe.render_samples(samples)
        pairs = [(r.image, r.metadata.get("prompt", "")) for r in results if r.image is not None]
    contact_sheet(pairs, args.columns, args.cell).save(args.out)
    print(f"wrote {args.out} ({len(pairs)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
