"""Score a text-to-image model on shapes-world captions that training never saw.

    python -m tools.evaluate --model PATH_OR_NAME --n 200 --seed 0 --out report.json
    python -m tools.evaluate                           # the shipped default model
    python -m tools.evaluate --ground-truth            # the scorer's self-test: must be 100%
    python -m tools.evaluate --stage vae               # the drawings through the VAE alone
    python -m tools.evaluate --stage upscaler          # the drawings upscaled by the x4 stage alone
    python -m tools.evaluate --guidance 4 --upscale-guidance 3   # other sampling settings

Half of the captions come from the "unseen" split (new combinations of trained pairs), half
from the "heldout" split (held-out colour-shape pairs); the summary reports one-object,
two-object and held-out captions apart. Images are scored at 256 x 256 whatever their size.
With --ground-truth the generator's own drawings are scored instead of a model's, and the
command fails unless every one of them is correct. --stage vae and --stage upscaler feed the
drawings to one stage of the model, to tell which stage loses what. Sampling settings left
out are each folder's render_defaults.json (what the values shipped there were chosen by).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Sequence

import numpy as np

from tools import shapes_world as sw

# render(captions, seeds) -> one uint8 (H, W, 3) image per caption, or a str: why there is none.
Renderer = Callable[[list[str], list[int]], list]


def evaluation_scenes(n: int, seed: int, split: str = "eval") -> list[sw.Scene]:
    """`n` caption-level scenes: for "eval", half "unseen" and half "heldout"; else of `split`."""
    if n < 1:
        raise ValueError(f"n is {n}: ask for at least one caption")
    rng = np.random.default_rng([seed, 1])
    if split == "eval":
        splits = ["unseen"] * (n - n // 2) + ["heldout"] * (n // 2)
    else:
        splits = [split] * n
    return [sw.sample_description(rng, s) for s in splits]


def model_renderer(model: str | None, batch_size: int, upscaler: str | None = None, **settings) -> Renderer:
    """A Renderer backed by a jaxdiff pipeline (`model=None`: the shipped default model and
    its upscaler; a folder renders its base stage only unless `upscaler` names one).
    `settings` (RenderSettings names; None: the folders' own) set how it samples."""
    import jaxdiff  # lazily: the evaluator's other modes work without the engine

    pipeline = jaxdiff.load_pipeline(model, upscaler, batch_size=batch_size, **settings)

    def render(captions: list[str], seeds: list[int]) -> list:
        images = []
        for start in range(0, len(captions), batch_size):
            results = pipeline.render(captions[start:start + batch_size],
                                      seeds=seeds[start:start + batch_size])
            images.extend(r.image if r.image is not None else (r.error or "no image rendered")
                          for r in results)
            print(f"rendered {len(images)}/{len(captions)}", file=sys.stderr, flush=True)
        return images

    return render


def vae_renderer(model: str | None, batch_size: int) -> Renderer:
    """The generator's 64 x 64 drawings through the model's VAE, encoded and decoded: what
    the base stage's decoder can show at best (`model=None`: the shipped default)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.checkpoints import default_model_path
    from jaxdiff.engine.programs import to_uint8
    from jaxdiff.weights.family import load_family

    family = load_family(model or default_model_path(), dtype=jnp.float32)
    graphdef, state = nnx.split(family.vae)

    @jax.jit
    def round_trip(state, images):
        vae = nnx.merge(graphdef, state)
        return to_uint8(vae.decode(vae.encode(images.astype(jnp.float32) / 127.5 - 1.0)[0]))

    drawings = ground_truth_renderer(sw.BASE_SIDE)

    def render(captions: list[str], seeds: list[int]) -> list:
        images = []
        for start in range(0, len(captions), batch_size):
            batch = np.stack(drawings(captions[start:start + batch_size], seeds[start:start + batch_size]))
            images.extend(np.asarray(round_trip(state, jnp.asarray(batch))))
        return images

    return render


def upscaler_renderer(upscaler: str | None, batch_size: int, **settings) -> Renderer:
    """The generator's 64 x 64 drawings upscaled x4 by the upscaler alone: what the second
    stage keeps of a perfect base image (`upscaler=None`: the shipped default-x4)."""
    from jaxdiff.checkpoints import default_upscaler_path
    from jaxdiff.engine import Pipeline, settings_for
    from jaxdiff.weights.family import load_family

    family = load_family(upscaler or default_upscaler_path())
    pipeline = Pipeline(None, family, batch_size=batch_size, settings=settings_for(None, family, **settings))
    drawings = ground_truth_renderer(sw.BASE_SIDE)

    def render(captions: list[str], seeds: list[int]) -> list:
        low = drawings(captions, seeds)
        return pipeline.upscale(low, captions, seeds=seeds)

    return render


def ground_truth_renderer(resolution: int) -> Renderer:
    """Draws each caption with the generator (geometry drawn from the seed)."""

    def render(captions: list[str], seeds: list[int]) -> list:
        images = []
        for caption, seed in zip(captions, seeds):
            scene = sw.place_objects(sw.parse_caption(caption), np.random.default_rng(seed))
            image = sw.draw(scene)
            images.append(image if resolution == sw.CANVAS else sw.downsample(image, resolution))
        return images

    return render


def evaluate(render: Renderer, scenes: Sequence[sw.Scene], seeds: Sequence[int]) -> dict:
    """Render and score every scene's caption; returns the summary and every example's score."""
    captions = [s.caption for s in scenes]
    images = render(list(captions), list(seeds))
    if len(images) != len(captions):
        raise RuntimeError(f"the renderer returned {len(images)} images for {len(captions)} captions")
    records, scores = [], []
    for scene, seed, image in zip(scenes, seeds, images):
        if image is None or isinstance(image, str):  # the renderer failed on this caption
            result = {a: False for a in sw.ATTRIBUTES} | {"correct": False, "regions": [],
                                                          "error": image or "no image rendered"}
        else:
            result = sw.score(np.asarray(image), scene)
        scores.append(result)
        records.append({"caption": scene.caption, "seed": int(seed), "group": scene.group,
                        "split": scene.split, **result})
    return {"summary": sw.summarize(scores, [s.group for s in scenes]), "examples": records}


def format_summary(summary: dict) -> str:
    columns = ("n", "correct") + sw.ATTRIBUTES
    lines = [f"{'group':<12}" + "".join(f"{c:>11}" for c in columns)]
    for group, entry in summary.items():
        cells = [f"{entry['n']:>11}"] + [
            f"{'-':>11}" if entry[c] is None else f"{entry[c]:>11.3f}" for c in columns[1:]]
        lines.append(f"{group:<12}" + "".join(cells))
    return "\n".join(lines)


def scored_weights(args) -> dict:
    """Which folders a report scores: the base model (none for the upscaler stage alone) and
    the x4 upscaler where one renders; neither for the ground truth."""
    if args.ground_truth:
        return {"model": None, "upscaler": None}
    if args.stage == "upscaler":
        return {"model": None, "upscaler": args.upscaler or "default-x4"}
    from jaxdiff.checkpoints import upscaler_for

    upscaler = upscaler_for(args.model, args.upscaler) if args.stage == "full" else None
    return {"model": args.model or "default", "upscaler": upscaler}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint folder (local or gs://) or model name; "
                                        "default: the shipped default model")
    source.add_argument("--ground-truth", action="store_true",
                        help="score the generator's own drawings (the scorer's self-test)")
    parser.add_argument("--n", type=int, default=200, help="number of captions (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed for captions and noise")
    parser.add_argument("--split", default="eval", choices=("eval",) + sw.SPLITS,
                        help="caption source: eval = half unseen, half heldout (default)")
    parser.add_argument("--batch-size", type=int, default=16, help="captions per render call")
    parser.add_argument("--resolution", type=int, default=sw.CANVAS, choices=(sw.BASE_SIDE, sw.CANVAS),
                        help="with --ground-truth: score the 256 drawing or its 64 x 64 version")
    parser.add_argument("--upscaler", default=None,
                        help="x4 folder to render base + upscale with a --model folder (the spec scores at 256)")
    parser.add_argument("--stage", default="full", choices=("full", "vae", "upscaler"),
                        help="full: render the captions (default); vae: the drawings at 64 through the "
                             "model's VAE; upscaler: the drawings at 64 upscaled by --upscaler alone")
    sampling = parser.add_argument_group("sampling (default: each folder's render_defaults.json, else SD's)")
    sampling.add_argument("--steps", type=int, default=None, help="base denoising steps")
    sampling.add_argument("--guidance", type=float, default=None, help="base guidance scale")
    sampling.add_argument("--upscale-steps", type=int, default=None, help="upscaler denoising steps")
    sampling.add_argument("--upscale-guidance", type=float, default=None, help="upscaler guidance scale")
    sampling.add_argument("--noise-level", type=int, default=None, help="noise added to the upscaler's input")
    parser.add_argument("--out", help="write the summary and every example's score to this JSON file")
    args = parser.parse_args(argv)
    settings = {"steps": args.steps, "guidance": args.guidance, "upscale_steps": args.upscale_steps,
                "upscale_guidance": args.upscale_guidance, "noise_level": args.noise_level}
    if args.batch_size < 1:
        parser.error(f"--batch-size is {args.batch_size}: give at least 1")

    scenes = evaluation_scenes(args.n, args.seed, args.split)
    seeds = [int(s) for s in np.random.default_rng([args.seed, 2]).integers(2**31, size=args.n)]
    if args.stage != "full" and args.ground_truth:
        parser.error("--stage scores one of a model's stages: leave out --ground-truth")
    if args.ground_truth:
        render = ground_truth_renderer(args.resolution)
    elif args.stage == "vae":
        render = vae_renderer(args.model, args.batch_size)
    elif args.stage == "upscaler":
        render = upscaler_renderer(args.upscaler, args.batch_size, **settings)
    else:
        render = model_renderer(args.model, args.batch_size, args.upscaler, **settings)
    started = time.perf_counter()
    report = evaluate(render, scenes, seeds)
    report |= {**scored_weights(args), "stage": args.stage,
               "ground_truth": args.ground_truth, "n": args.n, "seed": args.seed,
               "split": args.split, "settings": {k: v for k, v in settings.items() if v is not None},
               "seconds": round(time.perf_counter() - started, 2)}
    if args.ground_truth:
        report["resolution"] = args.resolution
    print(format_summary(report["summary"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.ground_truth and report["summary"]["all"]["correct"] < 1.0:
        print("ground-truth images scored incorrect: the scorer disagrees with the generator",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
