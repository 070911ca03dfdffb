"""The `jaxdiff render` command: flags, exit codes, and the Dataflow graph built offline."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from jaxdiff import cli
from pipelines import job


@pytest.fixture(autouse=True)
def own_tmpdir(tmp_path, monkeypatch):
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))


def test_the_command_answers_help_and_bad_flags_without_importing_jax():
    """`jaxdiff --help` and an argument error answer at once (JAX's import takes seconds, and a
    Ctrl-C before the command's own handler is in place would print Python's traceback)."""
    code = ("import sys, jaxdiff, jaxdiff.cli\n"
            "try:\n    jaxdiff.cli.main(['render', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'jax' not in sys.modules, 'jax imported'\n"
            "assert jaxdiff.Sample.__name__ == 'Sample'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: jaxdiff render" in done.stdout


def test_unknown_flags_go_to_beam():
    parser = cli.argparse.ArgumentParser()
    render = cli._render_parser(parser.add_subparsers())
    ours, beam_args = cli._split_beam_flags(
        ["a.jsonl", "--runner", "DataflowRunner", "--out", "gs://b/o", "--project=p", "b.jsonl",
         "--steps", "4", "--no_auth"], render)
    assert ours == ["a.jsonl", "--out", "gs://b/o", "b.jsonl", "--steps", "4"]
    assert beam_args == ["--runner", "DataflowRunner", "--project=p", "--no_auth"]


def test_a_beam_flag_without_a_value_leaves_the_next_flag_and_what_follows_double_dash_to_jaxdiff():
    """A Beam flag written without a value (--no_auth, --save_main_session) takes no value
    that starts with "-": the --out after it stays the command's. After "--" the words are
    manifests: "-b.jsonl" is one, not a flag."""
    parser = cli.argparse.ArgumentParser()
    render = cli._render_parser(parser.add_subparsers())
    ours, beam_args = cli._split_beam_flags(
        ["a.jsonl", "--no_auth", "--out", "o", "--save_main_session", "--dry-run"], render)
    assert (ours, beam_args) == (["a.jsonl", "--out", "o", "--dry-run"], ["--no_auth", "--save_main_session"])
    ours, beam_args = cli._split_beam_flags(["--out", "o", "--runner=DirectRunner", "--", "a.jsonl", "-b.jsonl"],
                                            render)
    assert (ours, beam_args) == (["--out", "o", "--", "a.jsonl", "-b.jsonl"], ["--runner=DirectRunner"])
    assert render.parse_args(ours).manifests == ["a.jsonl", "-b.jsonl"]


def test_dry_run_delay_takes_zero_and_fractions_of_a_second():
    """--dry-run-delay 0 is no delay, as leaving it out; a fraction sleeps that long."""
    parser = cli.argparse.ArgumentParser()
    render = cli._render_parser(parser.add_subparsers())
    for text, seconds in (("0", 0.0), ("0.25", 0.25), ("3", 3.0)):
        assert render.parse_args(["m.jsonl", "--out", "o", "--dry-run-delay", text]).dry_run_delay == seconds


@pytest.mark.faults
def test_abbreviated_flags_and_unknown_samplers_are_refused(tmp_path, capsys):
    from jaxdiff.samplers import SAMPLER_NAMES

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue square"}) + "\n")
    common = ["render", str(manifest), "--out", str(tmp_path / "out"), "--dry-run"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(common + ["--retry"])  # would otherwise go to Beam and do nothing
    assert exit_.value.code == 2 and "--retry-failures" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(common + ["--sampler", "plms"])
    assert "invalid choice: 'plms'" in capsys.readouterr().err
    parser = cli.argparse.ArgumentParser()
    render = cli._render_parser(parser.add_subparsers())
    sampler = next(a for a in render._actions if "--sampler" in a.option_strings)
    assert tuple(sampler.choices) == SAMPLER_NAMES
    assert render.parse_args(["m.jsonl", "--out", "o", "--sampler", "Euler_A"]).sampler == "euler_a"
    # A typo of one of ours that Beam does not know either would be dropped with a log line.
    for typo, meant in (["--guidence", "3"], "--guidance"), (["--batchsize=16"], "--batch-size"), \
                       (["--keep_base"], "--keep-base"):
        with pytest.raises(SystemExit):
            cli.main(common + typo)
        assert f"did you mean {meant}?" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # Beam's spelt as ours: Beam would discard it with a log line
        cli.main(common + ["--direct-num-workers", "4"])
    assert ("--direct-num-workers: did you mean Beam's --direct_num_workers? Neither jaxdiff nor Apache Beam "
            "knows this flag") in capsys.readouterr().err
    with pytest.raises(SystemExit):  # close to no flag at all
        cli.main(common + ["--colour=red"])
    assert "--colour: Neither jaxdiff nor Apache Beam knows this flag" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # found before the model loads, in one line, not Beam's whole usage
        cli.main(common + ["--dry_run"])
    said = capsys.readouterr().err
    assert "Apache Beam cannot read its flags: argument --dry_run: expected one argument" in said
    assert "--s3_api_version" not in said
    # Beam's --dry_run (Dataflow's: build and validate) with a local runner and without ours
    # would render for real; --dry_run=False says what it means.
    with pytest.raises(SystemExit):
        cli.main(["render", str(manifest), "--out", str(tmp_path / "out"), "--dry_run=True"])
    assert "for placeholder images without a model, write --dry-run" in capsys.readouterr().err
    assert cli.main(common + ["--dry_run=True", "--no-progress"]) == cli.EXIT_OK
    assert cli.main(common + ["--dry_run=False", "--no-progress", "--fresh"]) == cli.EXIT_OK
    # Beam's own flags still go to Beam.
    assert cli.main(common + ["--direct_num_workers=1", "--job_name=shapes", "--no-progress"]) == cli.EXIT_OK


@pytest.mark.faults
def test_glob_matching_nothing_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["render", str(tmp_path / "nothing-*.jsonl"), "--out", str(tmp_path / "out"), "--dry-run"])
    assert code == cli.EXIT_ERROR
    assert "matches no file" in capsys.readouterr().err


@pytest.mark.faults
def test_a_mistyped_model_name_is_named_with_the_closest_shipped_one(tmp_path, capsys):
    from jaxdiff.checkpoints import upscaler_for

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue square"}) + "\n")
    code = cli.main(["render", str(manifest), "--out", str(tmp_path / "out"), "--model", "defualt"])
    assert code == cli.EXIT_ERROR
    assert "model 'defualt' is no folder here, nor a shipped model (default, default-x4)" in capsys.readouterr().err
    assert "did you mean 'default'?" in str(pytest.raises(FileNotFoundError, job.with_model_defaults,
                                                          job.RenderConfig(model="defualt")).value)
    assert upscaler_for("default", "None") is None and upscaler_for(None, " NONE ") is None


@pytest.mark.faults
def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue square"}) + "\n")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = cli.main(["render", str(manifest), "--out", str(blocker / "out"), "--dry-run"])
    assert code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert f"jaxdiff render: error: cannot write to the output folder '{blocker / 'out'}'" in err
    assert "the pipeline failed" not in err and "Traceback" not in err  # nothing ran: it was refused before


@pytest.mark.faults
def test_bad_settings_are_clear_errors(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue square"}) + "\n")
    code = cli.main(["render", str(manifest), "--out", str(tmp_path / "out"), "--dry-run", "--batch-size", "0"])
    assert code == cli.EXIT_ERROR
    assert "--batch-size must be >= 1" in capsys.readouterr().err


@pytest.mark.faults
@pytest.mark.parametrize("flags,message", [
    (["--quality", "80"], "--quality applies to jpg and webp; png is lossless: leave --quality out"),
    (["--format", "jpg", "--quality", "0"], "--quality 0 is out of range: use a whole number from 1 to 100"),
    (["--format", "webp", "--quality", "101"], "--quality 101 is out of range")])
def test_quality_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys, flags, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue square"}) + "\n")
    out = tmp_path / "out"
    assert cli.main(["render", str(manifest), "--out", str(out), "--dry-run", "--no-progress"] + flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.pipeline
def test_quality_sets_the_compression_and_is_part_of_the_run(tmp_path, capsys):
    import webdataset as wds
    from PIL import Image

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"shape {i}"}) + "\n" for i in range(2)))

    def render(out, *flags):
        args = ["render", str(manifest), "--out", str(tmp_path / out), "--dry-run", "--width", "64",
                "--height", "64", "--no-progress", *flags]
        return cli.main(args), capsys.readouterr().err

    def images(out, ext):
        samples = wds.WebDataset(str(tmp_path / out / "shard-00000.tar"), shardshuffle=False)
        return {s["__key__"]: s[ext] for s in samples}

    for fmt, pil_format in (("jpg", "JPEG"), ("webp", "WEBP")):
        assert render(f"{fmt}-default", "--format", fmt)[0] == cli.EXIT_OK
        assert render(f"{fmt}-95", "--format", fmt, "--quality", "95")[0] == cli.EXIT_OK
        assert render(f"{fmt}-20", "--format", fmt, "--quality", "20")[0] == cli.EXIT_OK
        default, same, low = (images(f"{fmt}-{q}", fmt) for q in ("default", "95", "20"))
        assert default == same  # 95 is the default
        for key, data in low.items():
            assert len(data) < len(default[key])
            image = Image.open(io.BytesIO(data))
            assert image.format == pil_format and image.size == (64, 64)
        run = json.loads((tmp_path / f"{fmt}-20" / "run.json").read_text())
        assert run["config"]["quality"] == 20
    # Resuming with another quality would mix two compressions in one output.
    code, err = render("jpg-20", "--format", "jpg", "--quality", "30")
    assert code == cli.EXIT_ERROR and "quality: 20 -> 30" in err
    # A run recorded before --quality existed wrote jpg at 95: it resumes as such.
    run_file = tmp_path / "jpg-default" / "run.json"
    run = json.loads(run_file.read_text())
    del run["config"]["quality"]
    run_file.write_text(json.dumps(run))
    code, err = render("jpg-default", "--format", "jpg")
    assert code == cli.EXIT_OK and "1 already complete" in err
    code, err = render("jpg-default", "--format", "jpg", "--quality", "90")
    assert code == cli.EXIT_ERROR and "quality: 95 -> 90" in err


@pytest.mark.faults
def test_a_model_in_the_wrong_role_is_named_before_anything_renders(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue square"}) + "\n")
    # Else the x4 as base fails in Beam with a UNet shape error, the base as x4 on its noise level.
    cases = [(["--model", "default-x4", "--upscaler", "none"],
              "default-x4 is an x4 upscaler, not a base model: pass it as --upscaler"),
             (["--upscaler", "default"],
              "default is not an x4 upscaler (its UNet takes 4 input channels, an upscaler's 7): pass an upscaler")]
    for i, (flags, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert cli.main(["render", str(manifest), "--out", str(out), "--no-progress"] + flags) == cli.EXIT_ERROR
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not out.exists()  # refused before run.json is written


@pytest.mark.faults
def test_a_file_given_as_the_model_folder_is_named(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue square"}) + "\n")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    code = cli.main(["render", str(manifest), "--out", str(tmp_path / "out"), "--model", str(weights),
                     "--upscaler", "none", "--no-progress"])
    assert code == cli.EXIT_ERROR
    assert f"{weights} is a file; pass the diffusers pipeline folder" in capsys.readouterr().err


@pytest.mark.faults
@pytest.mark.parametrize("flags,message", [
    (["--model", ""], "--model is empty"),  # else the shipped model, unasked
    (["--model", "default", "--upscaler", " "], "--upscaler is empty"),
    (["--variant", ""], "--variant is empty"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),  # else accepted by a dry run
    (["--out", ""], "--out is empty"),  # else written to the working folder, never seen as complete
    (["--dry-run-delay", "-1"], "'-1' is not a finite number of seconds >= 0"),  # else a traceback from Beam
    (["--dry-run-delay", "inf"], "'inf' is not a finite number of seconds >= 0"),  # else a failed pipeline
    (["--dry-run-delay", "nan"], "'nan' is not a finite number of seconds >= 0")])  # else a failed pipeline
def test_empty_and_out_of_range_options_are_refused(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue square"}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["render", str(manifest), "--out", str(tmp_path / "out"), "--dry-run", "--no-progress"] + flags)
    assert exit_.value.code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "tmpdir"]  # nothing written


@pytest.mark.faults
@pytest.mark.parametrize("out", ["gs://", "gs:///renders"])
def test_a_gcs_output_without_a_bucket_is_refused(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)  # "gs://" joined as a local path would make a folder "gs:" here
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue square"}) + "\n")
    assert cli.main(["render", str(manifest), "--out", out, "--dry-run", "--no-progress"]) == cli.EXIT_ERROR
    assert f"--out {out} names no bucket: give gs://BUCKET or gs://BUCKET/PREFIX" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "tmpdir"]


@pytest.mark.pipeline
def test_cli_renders_and_reruns(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"shape {i}"}) + "\n" for i in range(3)))
    args = ["render", str(manifest), "--out", str(tmp_path / "out"), "--dry-run", "--width", "8", "--height", "8",
            "--format", "jpg", "--shard-size", "2", "--no-progress"]
    assert cli.main(args) == cli.EXIT_OK
    assert "rendered 3, failed 0" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-00000.tar", "shard-00001.tar"]
    assert cli.main(args) == cli.EXIT_OK
    assert "2 already complete" in capsys.readouterr().err


@pytest.mark.pipeline
@pytest.mark.faults
def test_a_run_whose_every_record_fails_says_so_and_nothing_else(tmp_path):
    """A fresh process, as a user runs it: stderr holds the progress bar and the summary,
    no notice from Beam's import about BigQuery clients, and no images/s from failures."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": ""}\nnot json\n')
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from jaxdiff.cli import main; sys.exit(main())", "render", str(manifest),
         "--out", str(tmp_path / "out"), "--dry-run", "--width", "8", "--height", "8"],
        env=dict(os.environ, NO_GCE_CHECK="true", JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=120)
    assert done.returncode == cli.EXIT_OK, done.stderr
    assert "rendered 0, failed 2" in done.stderr and " 0.0 images/s" in done.stderr
    assert "images=0" in done.stderr, "the progress bar counts images, not failed records"
    assert "WARNING" not in done.stderr, done.stderr


@pytest.mark.faults
def test_a_warning_of_the_job_is_said_once_as_the_commands_own(tmp_path):
    """A fresh process, as a user runs it: the job's warning (a resume at another batch
    shape, say) reads once, as "jaxdiff render: warning: ...", not again in logging's raw form."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a"}\n')
    code = ("import logging, sys, types\n"
            "from pipelines import job\n"
            "def run(*args, **kwargs):\n"
            "    logging.getLogger('pipelines.job').warning('resumed at another batch shape')\n"
            "    return types.SimpleNamespace(text=lambda: 'rendered 1', complete=True)\n"
            "job.run = run\n"
            "from jaxdiff.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, "render", str(manifest), "--out", str(tmp_path / "out"),
                           "--dry-run", "--no-progress"],
                          env=dict(os.environ, NO_GCE_CHECK="true", JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == cli.EXIT_OK, done.stderr
    assert done.stderr.splitlines() == ["jaxdiff render: warning: resumed at another batch shape",
                                        "jaxdiff render: rendered 1"]


@pytest.mark.pipeline
def test_the_documented_dataflow_command_builds_and_validates_its_job(gcs_bucket, capsys):
    """docs/dataflow.md's command, with Beam's own --dry_run=True: the job is built, its
    options validated against Dataflow and nothing submitted, so no shard commits (exit 1)."""
    from jaxdiff import storage

    bucket = f"gs://{gcs_bucket}"
    storage.write_bytes(f"{bucket}/prompts/a.jsonl", b'{"prompt": "a red circle"}\n')
    args = ["render", f"{bucket}/prompts/*.jsonl", "--out", f"{bucket}/renders/run1", "--dry-run", "--batch-size", "16",
            "--runner=DataflowRunner", "--project=my-project", "--region=us-central1",
            f"--temp_location={bucket}/tmp", "--sdk_container_image=us-central1-docker.pkg.dev/p/jaxdiff/worker-gpu:0.1.0",
            "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver",
            "--machine_type=g2-standard-8", "--number_of_worker_harness_threads=1", "--experiments=use_runner_v2",
            "--max_num_workers=16", "--dry_run=True"]
    assert cli.main(args) == cli.EXIT_INCOMPLETE
    assert "INCOMPLETE: 1 shard not committed" in capsys.readouterr().err
    run = json.loads(storage.read_text(f"{bucket}/renders/run1/run.json"))
    assert run["runner"] == "DataflowRunner"


@pytest.mark.faults
def test_dataflow_refuses_paths_its_workers_cannot_reach(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a"}\n')
    for runner in ("DataflowRunner", "dataflow", "Dataflow"):  # Beam takes each of these for Dataflow
        dataflow = [f"--runner={runner}", "--project=p", "--region=us-central1", "--temp_location=gs://b/tmp"]
        assert cli.main(["render", str(manifest), "--out", str(tmp_path / "out"), "--dry-run", *dataflow]) == \
            cli.EXIT_ERROR
        assert f"--out {tmp_path / 'out'} is on this machine, where Dataflow's workers cannot reach it: give a " \
            "gs:// " in capsys.readouterr().err
        assert not (tmp_path / "out").exists(), "refused before anything is written"


@pytest.mark.faults
def test_dataflow_refuses_a_manifest_on_this_machine_with_a_gcs_output(gcs_bucket, tmp_path, capsys):
    """The workers read the manifest: one on the launcher's disk is not there for them,
    though --out is on GCS. Beam's --dry_run builds and validates the job, submitting nothing."""
    from jaxdiff import storage

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a"}\n')
    out = f"gs://{gcs_bucket}/local-manifest/out"
    dataflow = ["--runner=DataflowRunner", "--project=my-project", "--region=us-central1",
                f"--temp_location=gs://{gcs_bucket}/tmp", "--dry_run=True"]
    assert cli.main(["render", str(manifest), "--out", out, "--dry-run", "--no-progress", *dataflow]) == cli.EXIT_ERROR
    assert f"manifest {manifest} is on this machine, where Dataflow's workers cannot reach it: give a gs:// " in \
        capsys.readouterr().err
    assert not storage.exists(out), "refused before anything is written"


def test_dataflow_options_validate_and_graph_builds_offline(tmp_path):
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner
    from pipelines import manifest

    options = job.pipeline_options([
        "--runner=DataflowRunner", "--project=my-project", "--region=us-central1",
        "--temp_location=gs://my-bucket/tmp", "--staging_location=gs://my-bucket/staging",
        "--dry_run=True",  # Beam's own: skips its online bucket checks
        "--sdk_container_image=us-docker.pkg.dev/p/jaxdiff/worker:latest",
        "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver",
    ])
    assert PipelineOptionsValidator(options, DataflowRunner()).validate() == []
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    config = job.RenderConfig(dry_run=True)
    specs = manifest.plan_shards([str(path)], 10)
    pipeline = job.build_pipeline(options, specs, "gs://my-bucket/out", job.RendererFactory(config),
                                  job.manifest_defaults(config), config)
    shutil.rmtree(pipeline.local_tempdir)  # Beam's, removed when a pipeline runs: this one never does
    proto = pipeline.to_runner_api()
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"PlannedShards", "SpreadShards", "RenderShards"} <= names


def test_dataflow_accelerator_workers_run_one_sdk_process_with_one_thread():
    """Dataflow's default, an SDK process per vCPU, would load the model in each, every one
    claiming the GPU's memory or the TPU's chips."""
    from apache_beam.options.pipeline_options import DebugOptions

    dataflow = ["--runner=DataflowRunner", "--project=p", "--region=us-central1", "--temp_location=gs://b/tmp"]
    gpu = "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
    tpu = "--dataflow_service_options=worker_accelerator=type:tpu-v5-lite-podslice;topology:1x1"
    for accelerator in (gpu, tpu):
        debug = job.pipeline_options([*dataflow, accelerator]).view_as(DebugOptions)
        assert "no_use_multiple_sdk_containers" in debug.experiments
        assert debug.number_of_worker_harness_threads == 1
    # What the flags say stays.
    debug = job.pipeline_options([*dataflow, gpu, "--experiments=use_multiple_sdk_containers,other",
                                  "--number_of_worker_harness_threads=4"]).view_as(DebugOptions)
    assert debug.experiments == ["use_multiple_sdk_containers", "other"]
    assert debug.number_of_worker_harness_threads == 4
    # CPU workers and local runs: Beam's defaults.
    for args in (dataflow, [gpu]):
        debug = job.pipeline_options(args).view_as(DebugOptions)
        assert not debug.experiments and debug.number_of_worker_harness_threads is None


@pytest.mark.pipeline
def test_run_wide_negative_prompt_and_strength_fill_what_records_leave_out(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "photo.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "plain", "prompt": "a circle"},
        {"id": "own", "prompt": "a square", "negative_prompt": "green"},
        {"id": "photo", "prompt": "a circle", "mode": "img2img", "init_image": "photo.png"},
        {"id": "photo_own", "prompt": "a circle", "mode": "img2img", "init_image": "photo.png", "strength": 0.3}]))
    out = tmp_path / "out"

    def render(*flags):
        code = cli.main(["render", str(manifest), "--out", str(out), "--dry-run", "--no-progress", *flags])
        return code, capsys.readouterr().err

    assert render("--negative-prompt", "blurry", "--strength", "0.5")[0] == cli.EXIT_OK
    rows = {r["id"]: r for r in pq.read_table(out / "shard-00000.parquet").to_pylist()}
    assert {k: r["negative_prompt"] for k, r in rows.items()} == {
        "plain": "blurry", "own": "green", "photo": "blurry", "photo_own": "blurry"}
    assert (rows["photo"]["strength"], rows["photo_own"]["strength"], rows["plain"]["strength"]) == (0.5, 0.3, None)
    # They decide the images: resuming with others is refused, naming them.
    code, err = render("--negative-prompt", "grainy", "--strength", "0.5")
    assert code == cli.EXIT_ERROR and "negative_prompt: 'blurry' -> 'grainy'" in err
    # A run recorded before these options rendered without a negative prompt, at strength
    # 0.75, clip skip 0: it resumes as such (0.75 named or not).
    run_file = out / "run.json"
    run = json.loads(run_file.read_text())
    for name in ("negative_prompt", "strength", "clip_skip"):
        del run["config"][name]
    run_file.write_text(json.dumps(run))
    assert render("--strength", "0.75")[0] == cli.EXIT_OK
    code, err = render("--negative-prompt", "blurry")
    assert code == cli.EXIT_ERROR and "negative_prompt: '' -> 'blurry'" in err


@pytest.mark.faults
def test_ctrl_c_while_a_remote_runner_works_says_the_job_goes_on(tmp_path, capsys, monkeypatch):
    """A Dataflow job goes on without the command that submitted it: Ctrl-C there must not say
    to rerun (a second job would render the same shards), nor end the command unasked."""
    import signal

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a"}\n')
    handlers = []

    def interrupted(*args, **kwargs):
        handlers.append(signal.getsignal(signal.SIGINT))
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "run", interrupted)
    # Python's own handler as the command starts (a shell's background job inherits SIGINT
    # ignored, which the command would then give back as it found it).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = cli.main(["render", str(manifest), "--out", "gs://b/out", "--dry-run", "--runner=DataflowRunner",
                         "--project=p", "--region=us-central1", "--temp_location=gs://b/tmp"])
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert code == cli.EXIT_INTERRUPTED and handlers == [signal.default_int_handler]
    assert "A job submitted to a remote runner goes on without this command: cancel it there" in \
        capsys.readouterr().err


@pytest.mark.faults
def test_a_pipeline_that_fails_unexpectedly_is_a_whole_run_error(tmp_path, capsys, monkeypatch):
    """Exit 1 says some shards are not committed yet and a rerun finishes them; an error
    the job did not foresee is 2, as the other whole-run errors, and names what failed."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a"}\n')

    def fails(*args, **kwargs):
        raise RuntimeError("simulated runner crash")

    monkeypatch.setattr(job, "run", fails)
    code = cli.main(["render", str(manifest), "--out", str(tmp_path / "out"), "--dry-run", "--no-progress"])
    assert code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "jaxdiff render: error: the pipeline failed: RuntimeError: simulated runner crash" in err
    assert "Traceback" not in err


@pytest.mark.faults
def test_a_dry_run_delay_without_a_dry_run_is_refused(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue square"}) + "\n")
    with pytest.raises(SystemExit) as exit_:  # before, the delay was ignored and the model rendered
        cli.main(["render", str(manifest), "--out", str(tmp_path / "out"), "--dry-run-delay", "2"])
    assert exit_.value.code == cli.EXIT_ERROR
    assert "--dry-run-delay applies to --dry-run only" in capsys.readouterr().err


@pytest.mark.faults
@pytest.mark.parametrize("flags, message", [
    (["--steps", "2000"], "invalid run setting steps=2000: use 1 to 1000 (the command's --steps"),
    (["--guidance", "99"], "invalid run setting guidance=99.0: use a number from 0 to 50.0 (the command's --guidance"),
    (["--width", "100"], "invalid run setting width=100: use a multiple of 8 up to"),
    (["--seed", "-1"], "invalid run setting seed=-1: use an integer from 0 to 4294967295 (the command's --seed)"),
    (["--strength", "1.5"], "invalid run setting strength=1.5: use a number in (0, 1] (the command's --strength)"),
    (["--upscale-steps", "0"], "--upscale-steps must be >= 1, got 0"),
    (["--noise-level", "-1"], "--noise-level must be >= 0, got -1"),
    (["--clip-skip", "-1"], "--clip-skip must be >= 0, got -1"),
    (["--upscale-guidance", "nan"], "--upscale-guidance must be a finite number >= 0, got nan")])
def test_run_settings_out_of_range_name_their_option(tmp_path, capsys, flags, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue square"}) + "\n")
    code = cli.main(["render", str(manifest), "--out", str(tmp_path / "out"), "--dry-run", "--no-progress"] + flags)
    assert code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.faults
def test_a_model_folders_setting_out_of_range_names_the_file(tmp_path, capsys):
    import shutil

    from jaxdiff.checkpoints import resolve_model

    folder = tmp_path / "model"
    shutil.copytree(resolve_model("default"), folder)
    (folder / "render_defaults.json").write_text('{"guidance": 60}')  # the engine takes it; a run's limit is 50
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue square"}) + "\n")
    code = cli.main(["render", str(manifest), "--out", str(tmp_path / "out"), "--model", str(folder),
                     "--upscaler", "none", "--no-progress"])
    assert code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert (f"{folder / 'render_defaults.json'}: guidance=60.0: use a number from 0 to 50.0; edit the file, "
            "or set --guidance for this run") in err
    assert "--guidance)" not in err and not (tmp_path / "out").exists()
