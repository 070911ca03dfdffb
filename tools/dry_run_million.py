"""Streams a 1,000,000-prompt manifest through the whole render job with the dry-run renderer.

    python tools/dry_run_million.py [--records 1000000] [--shard-size 10000] [--workdir DIR]

Prints the wall time and the peak resident memory of this process (the driver and the
in-process runner's worker). Rendering streams, so its memory stays flat as the manifest
grows; the duplicate-id pass holds one small entry per distinct id on a local runner.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

from pipelines import job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, deleted afterwards")
    args = parser.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="jaxdiff-million-")
    os.makedirs(workdir, exist_ok=True)
    manifest_path = os.path.join(workdir, "prompts.jsonl")
    with open(manifest_path, "w") as f:
        for i in range(args.records):
            f.write(json.dumps({"id": f"p{i:07d}", "prompt": f"a red circle left of a blue square, #{i}"}) + "\n")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = job.RenderConfig(dry_run=True, width=8, height=8, shard_size=args.shard_size,
                              batch_size=args.batch_size, steps=1)
    start = time.time()
    # fresh: a --workdir used before is measured again, not resumed
    summary = job.run([manifest_path], os.path.join(workdir, "out"), config, progress=False, fresh=True)
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(summary.text())
    print(json.dumps({"records": args.records, "shards": summary.shards, "rendered": summary.rendered,
                      "failed": summary.failed, "seconds": round(seconds, 1),
                      "images_per_s": round(summary.images_per_s, 1),
                      "peak_rss_mib_before_run": round(rss_before, 1), "peak_rss_mib": round(peak, 1)}))
    if not args.workdir:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
