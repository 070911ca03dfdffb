"""The Beam job with the real engine on tiny random checkpoints: base + x4 upscale into shards."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from jaxdiff import storage
from pipelines import job, shards
from tiny_models import make_sd_folder, make_upscaler_folder


@pytest.mark.pipeline
def test_manifest_renders_through_base_and_upscaler_into_shards(tmp_path, monkeypatch, caplog):
    import webdataset as wds

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    base = make_sd_folder(str(tmp_path / "sd"))
    upscaler = make_upscaler_folder(str(tmp_path / "x4"))
    # What each folder recommends applies where the run and the record say nothing.
    (tmp_path / "sd" / "render_defaults.json").write_text(json.dumps({"guidance": 5.5}))
    (tmp_path / "x4" / "render_defaults.json").write_text(json.dumps({"noise_level": 7}))
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(init)
    records = [
        {"id": "a", "prompt": "a red circle", "seed": 1},
        {"id": "b", "prompt": "a blue square " * 20},  # over-long: truncated, and recorded
        {"id": "c", "prompt": "a green circle", "mode": "img2img", "init_image": "init.png", "strength": 0.5},
        {"id": "d", "prompt": ""},                       # empty prompt: a failure record
        {"id": "e", "prompt": "two shapes", "negative_prompt": "blurry " * 80, "guidance": 3.0, "num_images": 2},
    ]
    manifest_path = tmp_path / "prompts.jsonl"
    manifest_path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = str(tmp_path / "out")
    config = job.RenderConfig(model=base, upscaler=upscaler, steps=2, sampler="ddim", batch_size=2,
                              shard_size=3, keep_base=True, image_format="webp")
    summary = job.run([str(manifest_path)], out, config, progress=False)
    assert summary.complete

    index = json.loads(storage.read_text(os.path.join(out, "index.json")))
    seen, metas = [], {}
    for entry in index["shards"]:
        for item in wds.WebDataset(os.path.join(out, entry["url"]), shardshuffle=False, empty_check=False):
            meta = json.loads(item["json"])
            image = np.asarray(Image.open(io.BytesIO(item["webp"])))
            assert image.shape == (64, 64, 3), "16x16 base, x4 upscaled"
            base_key = next(k for k in item if k.startswith("base"))
            assert np.asarray(Image.open(io.BytesIO(item[base_key]))).shape == (16, 16, 3)
            seen.append(meta["id"])
            metas[meta["id"]] = meta
    assert sorted(seen) == ["a", "b", "c", "e", "e_1"]
    assert metas["b"]["prompt_truncated"] is True and metas["a"]["prompt_truncated"] is False
    assert metas["c"]["mode"] == "img2img" and metas["c"]["strength"] == 0.5
    assert metas["e"]["guidance"] == 3.0 and metas["e"]["negative_prompt"] == "blurry " * 80
    assert metas["e"]["negative_prompt_truncated"] is True and metas["b"]["negative_prompt_truncated"] is False
    # Which file an image started from, and its checksum; no timings (a shard rendered again
    # is the same file).
    assert metas["c"]["init_image"] == str(init) and "mask" not in metas["c"] and "timings" not in metas["c"]
    # How the run batched and placed its work stays in run.json: another --batch-size gives the same json.
    assert "batch_size" not in metas["c"]["model"] and "devices" not in metas["c"]["model"]
    assert metas["c"]["model"]["base"]["sha256"]
    assert metas["c"]["init_image_sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()
    import pyarrow.parquet as pq

    rows = {r["id"]: r for e in index["shards"] for r in pq.read_table(os.path.join(out, e["parquet"])).to_pylist()}
    assert (rows["c"]["init_image"], rows["c"]["strength"], rows["a"]["init_image"]) == (str(init), 0.5, None)
    assert (rows["b"]["prompt_truncated"], rows["e"]["negative_prompt_truncated"]) == (True, True)
    assert metas["a"]["guidance"] == 5.5 and metas["a"]["noise_level"] == 7 and metas["a"]["steps"] == 2
    assert metas["a"]["seed"] == 1 and metas["e_1"]["seed"] != metas["e"]["seed"]
    failures = [json.loads(line) for f in sorted(os.listdir(os.path.join(out, "failures")))
                for line in open(os.path.join(out, "failures", f)) if line.strip()]
    assert [f["id"] for f in failures] == ["d"] and "prompt" in failures[0]["reason"]
    assert metas["a"]["upscale_guidance"] == 9.0 and metas["a"]["upscale_sampler"] == "ddim"
    run_record = json.loads(storage.read_text(os.path.join(out, "run.json")))
    assert run_record["config"]["guidance"] == 5.5 and run_record["config"]["sampler"] == "ddim"
    assert run_record["config"]["noise_level"] == 7  # the upscaler folder's, resolved for the record
    assert any(k.endswith("diffusion_pytorch_model.safetensors") for k in json.dumps(run_record).split('"'))

    # A resume must render as the run did: what either folder recommends, its weights and
    # the dtype are part of that; options spelled two ways are one.
    (tmp_path / "x4" / "render_defaults.json").write_text(json.dumps({"noise_level": 300}))
    with pytest.raises(job.RunConflict, match="noise_level: 7 -> 300"):
        job.run([str(manifest_path)], out, config, progress=False)
    (tmp_path / "x4" / "render_defaults.json").write_text(json.dumps({"noise_level": 7}))
    from jaxdiff.weights import family

    with monkeypatch.context() as m:  # dtype left open resolves per platform: as on an accelerator
        m.setattr(family, "default_dtype", lambda: family.jnp.bfloat16)
        with pytest.raises(job.RunConflict, match="base dtype: float32 -> bfloat16"):
            job.run([str(manifest_path)], out, config, progress=False)
    again = job.run([str(manifest_path)], out, config, progress=False)
    assert again.complete and again.rendered_shards == 0

    # The batch size is not part of the run, but a resume at another one is told what that changes.
    os.remove(os.path.join(out, "shard-00001" + shards.STATS_SUFFIX))
    with caplog.at_level(logging.WARNING, logger="pipelines.job"):
        job.run([str(manifest_path)], out, dataclasses.replace(config, batch_size=1), progress=False)
    assert "rendered 2 samples per chip, this run renders 1" in caplog.text
    assert "one level at most (float32)" in caplog.text and "--batch-size (2)" in caplog.text
    caplog.clear()
    os.remove(os.path.join(out, "shard-00001" + shards.STATS_SUFFIX))
    with caplog.at_level(logging.WARNING, logger="pipelines.job"):
        assert job.run([str(manifest_path)], out, dataclasses.replace(config, batch_size=1), progress=False).complete
    assert "samples per chip" not in caplog.text


@pytest.mark.pipeline
def test_pipeline_versus_engine_benchmark_runs(tmp_path):
    from tools import bench_pipeline

    base = make_sd_folder(str(tmp_path / "sd"))
    result = bench_pipeline.main(["--model", base, "--upscaler", "none", "--n", "8", "--batch-size", "4",
                                  "--steps", "2", "--out", str(tmp_path / "out")])
    assert result["complete"] and result["engine_images_per_s"] > 0 and result["ratio"] > 0
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".stats.json")]) == 4


@pytest.mark.faults
def test_the_runs_weight_variant_reaches_the_loader(tmp_path):
    from jaxdiff.weights.convert import CheckpointError

    base = make_sd_folder(str(tmp_path / "sd"))
    config = job.RenderConfig(model=base, upscaler="none", variant="bf16")
    assert config.identity()["variant"] == "bf16"  # a resumed run must use the same weights
    with pytest.raises(CheckpointError, match=r"unet.diffusion_pytorch_model\.bf16\.safetensors"):
        job.RendererFactory(config)()


@pytest.mark.pipeline
def test_the_job_prepares_samples_on_reader_threads_and_batches_them_as_the_engine_does(tmp_path):
    # The engine's prepare (settings resolved, init images resized to render size: ~50 ms
    # for a 2048 px photo) runs on the job's reader threads while a batch renders; the job
    # groups samples by the engine's own key, so each batch is one program: distilled LCM
    # img2img samples whose strengths keep other grid points are not batched together.
    import threading

    import jaxdiff
    import webdataset as wds
    from pipelines import manifest

    folder = make_sd_folder(str(tmp_path / "lcm"), scheduler="LCMScheduler", time_cond_proj_dim=8, seed=4)
    pipe = jaxdiff.load_pipeline(folder, upscaler="none", batch_size=2)
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((48, 40), 255, np.uint8)).save(mask)
    strengths = [0.5, 1.0, 0.5, 1.0]
    records = [{"id": f"r{i}", "prompt": f"shape {i}", "mode": "img2img", "init_image": str(init), "strength": s}
               for i, s in enumerate(strengths)] + [{"id": "t", "prompt": "plain"}]
    # A sample the engine cannot prepare (no LCM inpainting on a distilled model) is its failure.
    records.append({"id": "bad", "prompt": "x", "mode": "inpaint", "init_image": str(init), "mask": str(mask)})
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    prepared_on, batches = {}, []
    prepare_all, render_samples = pipe.prepare_all, pipe.render_samples

    def recording_prepare(samples):
        for sample in samples:  # render_samples passes prepared ones through it too
            if isinstance(sample, jaxdiff.Sample):
                prepared_on.setdefault(sample.id, threading.current_thread().name)  # where first prepared
        return prepare_all(samples)

    def recording_render(items):
        batches.append([(item.sample.id, item.batch_key) if isinstance(item, jaxdiff.engine.PreparedSample)
                        else (item.id, None) for item in items])
        return render_samples(items)

    pipe.prepare_all, pipe.render_samples = recording_prepare, recording_render
    defaults = job.manifest_defaults(job.RenderConfig(steps=4, sampler="lcm", guidance=8.0))
    spec = manifest.plan_shards([str(manifest_path)], 100)[0]
    stats = job.render_shard(spec, str(tmp_path / "out"), pipe, defaults, model_info={})
    assert (stats["rendered"], stats["failed"]) == (5, 1)
    assert sorted(prepared_on) == ["bad", "r0", "r1", "r2", "r3", "t"]
    assert all(name.startswith("record-reader") for name in prepared_on.values())
    assert sorted(sorted(sample_id for sample_id, _ in batch) for batch in batches) == [
        ["r0", "r2"], ["r1", "r3"], ["t"]]
    (failure,) = [json.loads(line) for line in open(tmp_path / "out" / "failures" / "shard-00000.jsonl")]
    assert failure["id"] == "bad" and failure["stage"] == "render" and "not mode inpaint" in failure["reason"]
    assert all(len({key for _, key in batch}) == 1 for batch in batches)  # one program each
    # The images are what the engine renders from the same samples handed to it directly.
    raws = list(manifest.read_shard(spec))
    direct = render_samples([s for raw in raws[:5] for s in manifest.to_samples(raw, defaults)])
    shard = {item["__key__"]: np.asarray(Image.open(io.BytesIO(item["png"])))
             for item in wds.WebDataset(str(tmp_path / "out" / "shard-00000.tar"), shardshuffle=False)}
    assert len(shard) == 5
    for position, expected in enumerate(direct):
        got = shard[f"00000_{position:06d}"].astype(int)
        assert np.abs(got - expected.image.astype(int)).max() <= 1, expected.id


@pytest.mark.pipeline
def test_the_commands_x4_and_text_options_reach_the_engine(tmp_path, monkeypatch):
    import webdataset as wds

    from jaxdiff import cli

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    base = make_sd_folder(str(tmp_path / "sd"))
    upscaler = make_upscaler_folder(str(tmp_path / "x4"))
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text(json.dumps({"id": "a", "prompt": "a red circle", "seed": 3}) + "\n")

    def render(out, *flags):
        code = cli.main(["render", str(manifest_path), "--out", str(tmp_path / out), "--model", base,
                         "--upscaler", upscaler, "--steps", "2", "--sampler", "ddim", "--no-progress", *flags])
        assert code == cli.EXIT_OK
        (item,) = [(json.loads(s["json"]), np.asarray(Image.open(io.BytesIO(s["png"]))))
                   for s in wds.WebDataset(str(tmp_path / out / "shard-00000.tar"), shardshuffle=False)]
        return item

    meta, image = render("plain")
    meta_set, image_set = render("set", "--negative-prompt", "blurry", "--clip-skip", "1", "--upscale-steps", "3",
                                 "--upscale-sampler", "euler", "--upscale-guidance", "2", "--noise-level", "5")
    assert (meta["upscale_steps"], meta["noise_level"]) == (20, 20)  # the engine's defaults
    assert {k: meta_set[k] for k in ("negative_prompt", "upscale_steps", "upscale_sampler", "upscale_guidance",
                                     "noise_level")} == {"negative_prompt": "blurry", "upscale_steps": 3,
                                                         "upscale_sampler": "euler", "upscale_guidance": 2.0,
                                                         "noise_level": 5}
    assert meta_set["model"]["settings"]["clip_skip"] == 1
    assert not np.array_equal(image, image_set)
    # Each of the text options alone changes the image: they reach the programs.
    _, image_skip = render("skip", "--clip-skip", "1")
    _, image_negative = render("negative", "--negative-prompt", "blurry")
    assert not np.array_equal(image, image_skip) and not np.array_equal(image, image_negative)


@pytest.mark.pipeline
def test_run_inference_renders_every_mode_with_the_engine_from_arrays_and_pil_images(tmp_path):
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.testing.util import assert_that, equal_to

    from jaxdiff.engine.sample import Sample
    from pipelines.handler import JaxDiffusionModelHandler

    base = make_sd_folder(str(tmp_path / "sd"))
    factory = job.RendererFactory(job.RenderConfig(model=base, upscaler="none", steps=2, sampler="ddim",
                                                   batch_size=2))
    photo = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    samples = [
        Sample(id="text", prompt="a red circle", seed=1),
        Sample(id="array", prompt="a red circle", mode="img2img", init_image=photo, strength=0.5, seed=2),
        Sample(id="pil", prompt="a red circle", mode="img2img", init_image=Image.fromarray(photo), seed=3),
        Sample(id="inpaint", prompt="a red circle", mode="inpaint", init_image=Image.fromarray(photo),
               mask=Image.fromarray(mask), seed=4),
        Sample(id="bad", prompt="a red circle", mode="inpaint", init_image=photo, mask=mask[:, :4], seed=5),
    ]
    with beam.Pipeline("FnApiRunner") as p:
        results = (p | beam.Create(samples) | RunInference(JaxDiffusionModelHandler(factory, batch_size=2))
                   | beam.Map(lambda r: (r.id, None if r.image is None else r.image.shape,
                                         r.error and r.error.split(":")[0])))
        assert_that(results, equal_to([("text", (16, 16, 3), None), ("array", (16, 16, 3), None),
                                       ("pil", (16, 16, 3), None), ("inpaint", (16, 16, 3), None),
                                       ("bad", None, "mask is 4x16 but init_image is 16x16, another aspect ratio")]))


@pytest.mark.pipeline
def test_a_compilation_cache_on_gcs_serves_the_next_process(gcs_bucket, tmp_path):
    """--compilation-cache gs://...: a job's workers share compiled programs; a process that
    finds them there loads them instead of compiling."""
    import subprocess
    import sys

    base = make_sd_folder(str(tmp_path / "sd"))
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text(json.dumps({"id": "a", "prompt": "a red circle", "seed": 3}) + "\n")
    cache = f"gs://{gcs_bucket}/xla-cache"
    command = [sys.executable, "-c", "import sys; from jaxdiff.cli import main; sys.exit(main())", "render",
               str(manifest_path), "--model", base, "--upscaler", "none", "--steps", "2", "--no-progress",
               "--compilation-cache", cache]
    env = dict(os.environ, JAX_PLATFORMS="cpu", NO_GCE_CHECK="true", TMPDIR=str(tmp_path),
               JAX_LOG_COMPILES="0", JAX_DEBUG_LOG_MODULES="jax._src.compilation_cache,jax._src.compiler")

    def run(out):
        done = subprocess.run([*command, "--out", str(tmp_path / out)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stderr

    first = run("first")
    entries = storage.list_dir(cache)
    assert any(name.startswith("jit_") for name in entries), entries
    second = run("second")
    assert "Persistent compilation cache hit" in second and "Persistent compilation cache hit" not in first
    assert storage.list_dir(cache) == entries  # nothing compiled anew


@pytest.mark.faults
def test_a_gcs_compilation_cache_without_gcsfs_names_the_package(monkeypatch):
    import importlib.util

    from jaxdiff.engine import enable_compilation_cache

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"compilation cache gs://b/xla: a gs:// cache needs the gcsfs package: "
                                         r"pip install 'jaxdiff\[dataflow\]'"):
        enable_compilation_cache("gs://b/xla")
