"""Peak host memory while loading one checkpoint component, against its size on disk.

    python -m tools.make_random_checkpoint --arch sd15 --out /tmp/sd15-random
    JAX_PLATFORMS=cpu python -m tools.measure_load_memory /tmp/sd15-random --component unet

The load runs in a fresh subprocess so its RSS high-water mark (getrusage ru_maxrss)
covers only the interpreter, the imports and the load. Prints one JSON line:
peak RSS, RSS after imports (before loading), the weight files' bytes, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, os, resource, sys, time
folder, component, dtype_name = sys.argv[1:4]

def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

import jax, jax.numpy as jnp
from flax import nnx
from jaxdiff.weights.family import load_component
import importlib
importlib.import_module(
    {"unet": "jaxdiff.models.unet", "vae": "jaxdiff.models.vae",
     "text_encoder": "jaxdiff.models.clip"}[component])
baseline = rss_bytes()
start = time.perf_counter()
loaded = load_component(folder, component, dtype=getattr(jnp, dtype_name))
params = nnx.state(loaded.module, nnx.Param)
jax.block_until_ready(jax.tree.leaves(params))
seconds = time.perf_counter() - start
param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
weight_files = {k: v for k, v in loaded.sha256.items() if not k.endswith(".json")}
print(json.dumps({
    "baseline_rss": baseline,
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "param_bytes": param_bytes,
    "weight_files": sorted(weight_files),
    "seconds": round(seconds, 2),
}))
"""


def measure(folder: str, component: str = "unet", dtype: str = "float32") -> dict:
    """Loads `folder/component` in a subprocess; returns the memory figures as a dict."""
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("NO_GCE_CHECK", "true")
    result = subprocess.run([sys.executable, "-c", _CHILD, folder, component, dtype],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"loading {folder}/{component} failed:\n{result.stderr[-4000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    checkpoint_bytes = sum(os.path.getsize(p) for p in figures["weight_files"])
    figures["checkpoint_bytes"] = checkpoint_bytes
    figures["peak_over_checkpoint"] = round(figures["peak_rss"] / checkpoint_bytes, 3)
    figures["load_growth_over_checkpoint"] = round(
        (figures["peak_rss"] - figures["baseline_rss"]) / checkpoint_bytes, 3)
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a local pipeline folder (holds unet/, vae/, ...)")
    parser.add_argument("--component", default="unet", choices=("unet", "vae", "text_encoder"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.folder, args.component, args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
