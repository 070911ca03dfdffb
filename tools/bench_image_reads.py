"""Does reading records' input images hold the renders back? An img2img dry run whose init
images are gs:// objects on a GCS emulator (a process of its own), with a sleep per batch standing in
for the accelerator and, optionally, a delay added to each image read standing in for a
remote bucket's round trip (the emulator on loopback answers in ~3 ms).

    python -m tools.bench_image_reads --n 96 --batch-size 16 --batch-seconds 0.4 --read-latency 0.04

Prints one JSON line: the run's seconds against the floor the batches alone take (n /
batch size x batch seconds). Input images load on reader threads ahead of the renders
(pipelines/job.py), so the two should differ by the first batch's reads and the run's
fixed costs only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tools.bench_image_reads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=96, help="img2img records, each with its own 512 px init image")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batch-seconds", type=float, default=0.4, help="the accelerator's time per batch")
    p.add_argument("--read-latency", type=float, default=0.0, help="seconds added to each image read")
    args = p.parse_args(argv)

    # The emulator in a process of its own: in this one, its request handling would take
    # the GIL from the job's threads, which a remote bucket does not.
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--port", str(port),
                               "--in-memory", "--default-bucket", "images", "--quiet"])
    previous = {name: os.environ.get(name) for name in ("STORAGE_EMULATOR_HOST", "NO_GCE_CHECK")}
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["NO_GCE_CHECK"] = "true"  # no metadata server to probe
    try:
        _wait_for(port)
        return _run(args)
    finally:
        server.terminate()
        server.wait()
        for name, value in previous.items():  # a caller's own emulator, if any, comes back
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _wait_for(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the GCS emulator did not start on port {port}") from None
            time.sleep(0.1)


def _run(args) -> dict:
    from jaxdiff import storage
    from pipelines import job

    rng = np.random.default_rng(0)
    lines = []
    for i in range(args.n):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(png, "PNG")
        storage.write_bytes(f"gs://images/init/{i}.png", png.getvalue())
        lines.append(json.dumps({"id": f"r{i}", "prompt": "p", "mode": "img2img",
                                 "init_image": f"gs://images/init/{i}.png"}))
    storage.write_bytes("gs://images/m.jsonl", ("\n".join(lines) + "\n").encode())
    read_bytes = storage.read_bytes

    def remote_read(path):
        if "/init/" in str(path):
            time.sleep(args.read_latency)
        return read_bytes(path)

    config = job.RenderConfig(dry_run=True, width=64, height=64, batch_size=args.batch_size,
                              dry_run_delay_s=args.batch_seconds)
    storage.read_bytes = remote_read
    try:
        start = time.perf_counter()
        summary = job.run(["gs://images/m.jsonl"], "gs://images/out", config, progress=False, fresh=True)
        seconds = time.perf_counter() - start
    finally:
        storage.read_bytes = read_bytes
    floor = -(-args.n // args.batch_size) * args.batch_seconds
    result = {"n": args.n, "batch_size": args.batch_size, "batch_seconds": args.batch_seconds,
              "read_latency": args.read_latency, "rendered": summary.rendered, "seconds": round(seconds, 2),
              "floor_seconds": round(floor, 2), "over_floor_seconds": round(seconds - floor, 2)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
