"""The Beam pipeline's images/s against the engine alone: same model, batch and samples.

    python -m tools.bench_pipeline --model PATH --upscaler none --n 256 --batch-size 16 --steps 25

Both sides use one loaded, warmed engine (compile time apart); the pipeline side is a
whole local `jaxdiff render` run (manifest reading, batching, image encoding, tar /
parquet writing, commit markers) through Beam's in-process runner. Prints one JSON line;
the goal on an accelerator is a ratio of at least 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from apache_beam.utils import shared

from jaxdiff.engine import Sample
from pipelines import job


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped model)")
    p.add_argument("--upscaler", default=None, help="x4 folder, or none")
    p.add_argument("--n", type=int, default=64, help="samples on each side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--shard-size", type=int, default=None, help="default: n / 4")
    p.add_argument("--format", default="png", choices=["png", "jpg", "webp"])
    p.add_argument("--out", default=None, help="output folder of the pipeline run (default: a temp dir)")
    args = p.parse_args(argv)

    config = job.RenderConfig(model=args.model, upscaler=args.upscaler, steps=args.steps,
                              batch_size=args.batch_size, shard_size=args.shard_size or max(1, args.n // 4),
                              image_format=args.format)
    factory = job.RendererFactory(config)
    handle = shared.Shared()
    engine = handle.acquire(factory)
    prompts = [f"a small red circle number {i}" for i in range(args.n)]
    samples = [Sample(id=f"s{i:06d}", prompt=p, seed=i) for i, p in enumerate(prompts)]
    engine.render_samples(samples[:args.batch_size])  # compile

    t = time.perf_counter()
    engine.render_samples(samples)
    engine_ips = args.n / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory(prefix="jaxdiff-bench-pipeline-") as work:
        manifest = os.path.join(work, "prompts.jsonl")
        with open(manifest, "w") as f:
            for s in samples:
                f.write(json.dumps({"id": s.id, "prompt": s.prompt, "seed": s.seed}) + "\n")
        out = args.out or os.path.join(work, "out")
        t = time.perf_counter()
        summary = job.run([manifest], out, config, renderer_factory=factory, progress=False, fresh=True,
                          shared_handle=handle)
        pipeline_ips = summary.processed_now / (time.perf_counter() - t)
    result = {"n": args.n, "batch_size": args.batch_size, "steps": args.steps,
              "engine_images_per_s": round(engine_ips, 3), "pipeline_images_per_s": round(pipeline_ips, 3),
              "ratio": round(pipeline_ips / engine_ips, 3), "complete": summary.complete}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
