"""Does storage hold the renders back? A dry run on a GCS emulator (a process of its own),
with a sleep per batch standing in for the accelerator, and optional sleeps standing in for
a remote bucket: a round trip added to each input image read (the emulator on loopback
answers in ~3 ms), and each upload slowed to a bucket's bandwidth.

Reads: img2img records whose init images are gs:// objects.

    python -m tools.bench_storage --n 96 --batch-size 16 --batch-seconds 0.4 --read-latency 0.04

Writes: text-to-image records whose shards go to gs://, at 100 MB/s of uploads.

    python -m tools.bench_storage --mode txt2img --n 256 --batch-size 16 --batch-seconds 0.4 \
        --size 1024 --format jpg --shard-size 64 --upload-mb-per-s 100

Prints one JSON line: the run's seconds against the floor the batches alone take (n /
batch size x batch seconds). Input images load on reader threads ahead of the renders, and
a shard's files upload while the next shard renders (pipelines/job.py), so the two should
differ by the first batch's reads, the last shard's commit and the run's fixed costs only.
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
    p = argparse.ArgumentParser(prog="python -m tools.bench_storage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=96, help="img2img records, each with its own 512 px init image")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batch-seconds", type=float, default=0.4, help="the accelerator's time per batch")
    p.add_argument("--read-latency", type=float, default=0.0, help="seconds added to each image read")
    p.add_argument("--mode", choices=["img2img", "txt2img"], default="img2img",
                   help="img2img: records with their own 512 px init image; txt2img: prompts only")
    p.add_argument("--size", type=int, default=64, help="the rendered images' side")
    p.add_argument("--format", choices=["png", "jpg", "webp"], default="png")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--upload-mb-per-s", type=float, default=0.0,
                   help="uploads slowed to this bandwidth (0: as fast as the emulator takes them)")
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
        record = {"id": f"r{i}", "prompt": f"prompt {i}"}
        if args.mode == "img2img":
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(png, "PNG")
            storage.write_bytes(f"gs://images/init/{i}.png", png.getvalue())
            record.update(mode="img2img", init_image=f"gs://images/init/{i}.png")
        lines.append(json.dumps(record))
    storage.write_bytes("gs://images/m.jsonl", ("\n".join(lines) + "\n").encode())
    read_bytes, put_file = storage.read_bytes, storage.put_file

    def remote_read(path):
        if "/init/" in str(path):
            time.sleep(args.read_latency)
        return read_bytes(path)

    def remote_upload(local_path, dest):
        if args.upload_mb_per_s and storage.is_gcs(dest):
            time.sleep(os.path.getsize(local_path) / (args.upload_mb_per_s * 1e6))
        return put_file(local_path, dest)

    config = job.RenderConfig(dry_run=True, width=args.size, height=args.size, batch_size=args.batch_size,
                              shard_size=args.shard_size, image_format=args.format,
                              dry_run_delay_s=args.batch_seconds)
    storage.read_bytes, storage.put_file = remote_read, remote_upload
    try:
        start = time.perf_counter()
        summary = job.run(["gs://images/m.jsonl"], "gs://images/out", config, progress=False, fresh=True)
        seconds = time.perf_counter() - start
    finally:
        storage.read_bytes, storage.put_file = read_bytes, put_file
    floor = -(-args.n // args.batch_size) * args.batch_seconds
    result = {"mode": args.mode, "n": args.n, "batch_size": args.batch_size, "batch_seconds": args.batch_seconds,
              "size": args.size, "format": args.format, "shard_size": args.shard_size,
              "read_latency": args.read_latency, "upload_mb_per_s": args.upload_mb_per_s,
              "rendered": summary.rendered, "seconds": round(seconds, 2),
              "floor_seconds": round(floor, 2), "over_floor_seconds": round(seconds - floor, 2)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
