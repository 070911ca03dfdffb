"""The `jaxdiff` command.

    jaxdiff render MANIFEST... --out DIR [options] [Beam pipeline options]

Flags jaxdiff does not know are passed to Apache Beam as pipeline options
(`--runner=DataflowRunner`, `--direct_num_workers=4`, ...); one Beam does not know either is
refused. Exit status: 0 when every manifest id is accounted for (rendered or in failures/),
1 when some shards are not committed, 2 for a whole-run error (bad manifest path,
unwritable output, conflicting run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading

EXIT_OK, EXIT_INCOMPLETE, EXIT_ERROR = 0, 1, 2
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by Ctrl-C


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds >= 0")
    return value


def _render_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "render", help="render every record of one or more manifests into image shards",
        description="Render manifests into webdataset shards (tar + parquet + stats). Rerunning the same "
                    "command resumes: complete shards are skipped. Other --flags go to Apache Beam as its pipeline "
                    "options.")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST",
                   help="manifest files or glob patterns (.jsonl, .json (JSON lines), .csv, .txt, each "
                        "optionally .gz, or .parquet; local or gs://), read in sorted path order")
    p.add_argument("--out", required=True, help="output folder, local or gs://bucket/prefix")
    p.add_argument("--model", default=None, help="diffusers folder (local or gs://), or a Hub id already in the "
                                                 "local Hugging Face cache (owner/name); default: the shipped model")
    p.add_argument("--upscaler", default=None,
                   help="x4 upscaler folder or Hub id (as --model), or 'none'; default: the shipped x4 "
                        "with the shipped model, none with any other")
    p.add_argument("--width", type=int, default=None,
                   help="image width, a multiple of the model's (16 for the shipped model, 64 for SD); default: "
                        "the native size for txt2img, the photo's aspect ratio for image modes, the canvas for "
                        "outpaint")
    p.add_argument("--height", type=int, default=None, help="image height (as --width)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the model's render_defaults.json; 4 for an LCMScheduler "
                        "model; else 25)")
    # The engine's sampler names, spelled out so that --help needs no JAX import.
    p.add_argument("--sampler", default=None, type=str.lower,
                   choices=["ddim", "dpmpp_2m", "euler", "euler_a", "ddpm", "lcm"],
                   help="default: the model's render_defaults.json; lcm for an LCMScheduler model; else dpmpp_2m")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's render_defaults.json; for an "
                        "LCMScheduler model 8.5, or 1 without a guidance-distilled UNet; else 7.5)")
    p.add_argument("--negative-prompt", default="", metavar="TEXT",
                   help="negative prompt of the records that give none (default: none)")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img strength of the records that give none, in (0, 1] (default 0.75)")
    p.add_argument("--clip-skip", type=int, default=0,
                   help="text encoder layers to skip from the top, as some fine-tuned models ask (default 0)")
    p.add_argument("--upscale-steps", type=int, default=None,
                   help="x4 stage: denoising steps (default: the upscaler's render_defaults.json, else 20)")
    p.add_argument("--upscale-sampler", default=None, type=str.lower,
                   choices=["ddim", "dpmpp_2m", "euler", "euler_a", "ddpm", "lcm"],
                   help="x4 stage: sampler (default: the upscaler's render_defaults.json, else its scheduler's)")
    p.add_argument("--upscale-guidance", type=float, default=None,
                   help="x4 stage: guidance scale (default: the upscaler's render_defaults.json, else 9)")
    p.add_argument("--noise-level", type=int, default=None,
                   help="x4 stage: noise added to the low-res image, 0 to the upscaler's max_noise_level "
                        "(default: the upscaler's render_defaults.json, else 20)")
    p.add_argument("--seed", type=int, default=0, help="run seed; records without a seed derive theirs from it")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch, split over the local chips (default 8)")
    p.add_argument("--shard-size", type=int, default=1000, help="manifest records per shard (default 1000)")
    p.add_argument("--format", dest="image_format", default="png", choices=["png", "jpg", "webp"],
                   help="image format in the shards (default png)")
    p.add_argument("--quality", type=int, default=None,
                   help="jpg / webp quality, 1 to 100 (default 95)")
    # The dtypes the models compute in (jaxdiff.weights.family), spelled out: --help needs no JAX.
    p.add_argument("--dtype", default=None, type=str.lower, choices=["bfloat16", "float16", "float32"],
                   help="model dtype (default: bfloat16 on accelerators, float32 on CPU)")
    p.add_argument("--variant", default=None,
                   help="the folders' weight variant, e.g. fp16 for diffusion_pytorch_model.fp16.safetensors "
                        "(default: the plain files, or the only variant a folder has); components without "
                        "that variant's files load their plain ones, as long as some component of the model "
                        "or the upscaler has it: where none has, the run is refused")
    p.add_argument("--compilation-cache", default=None, metavar="FOLDER",
                   help="where compiled programs persist, a local folder or gs://bucket/prefix that all of a "
                        "Dataflow job's workers share (default: $JAXDIFF_CACHE_DIR, else ~/.cache/jaxdiff/xla)")
    p.add_argument("--keep-base", action="store_true", help="also store the base image before upscaling")
    p.add_argument("--dry-run", action="store_true",
                   help="skip the model: write deterministic placeholder images (checks manifests and output)")
    p.add_argument("--dry-run-delay", type=_seconds, default=0.0, metavar="SECONDS",
                   help="with --dry-run, sleep this long per batch (to watch progress or try a resume)")
    p.add_argument("--fresh", "--overwrite", dest="fresh", action="store_true",
                   help="delete an earlier run's shards in --out and start over")
    p.add_argument("--retry-failures", action="store_true",
                   help="render again only the ids listed in failures/ of complete shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _split_beam_flags(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """Separates the flags our parser does not know (Beam's) from ours.

    An unknown `--flag value` takes the next word as its value unless that starts with "-";
    write boolean Beam flags after the manifests or as `--flag=true` forms Beam accepts.
    """
    known = {s for action in parser._actions for s in action.option_strings}
    ours, beam_args, i = [], [], 0
    while i < len(argv):
        word = argv[i]
        name = word.split("=", 1)[0]
        if word.startswith("--") and name not in known and word != "--":
            meant = sorted(flag for flag in known if flag.startswith(name) and flag.startswith("--"))
            if meant:  # argparse would take the abbreviation; here it would reach Beam, unseen
                parser.error(f"{name}: write the whole flag ({' or '.join(meant)}); "
                             "flags jaxdiff does not know go to Apache Beam")
            beam_args.append(word)
            if "=" not in word and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                beam_args.append(argv[i + 1])
                i += 1
        else:
            ours.append(word)
        i += 1
    return ours, beam_args


def _check_beam_flags(beam_args: list[str], parser: argparse.ArgumentParser, placeholders: bool) -> bool:
    """Beam's flags, read as Beam reads them; returns whether they name a local runner. A flag
    that Beam does not know either is refused (Beam would only log that it discards it, and
    the run would go on without it), as a typo of ours where it is close to one. Beam's --dry_run
    with a local runner, without our --dry-run (`placeholders`), is ours mistyped: the run
    would render for real."""
    import difflib

    from pipelines import job  # first: its package filters Beam's import-time notice
    from apache_beam.options.pipeline_options import TestOptions

    options = job.pipeline_options(beam_args)
    beam_logger = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_logger.level
    beam_logger.setLevel(logging.ERROR)  # its "Discarding unparseable args" notice: said better below
    said = io.StringIO()
    parsers: list[argparse.ArgumentParser] = []
    try:
        with contextlib.redirect_stderr(said):  # Beam's parser prints its whole usage on an error
            options.get_all_options(add_extra_args_fn=parsers.append)  # Beam's parser, every option it knows
            unknown = {arg.split("=", 1)[0][2:] for arg in parsers[0].parse_known_args(beam_args)[1]
                       if arg.startswith("--")}
    except SystemExit:
        lines = [line for line in said.getvalue().splitlines() if line.strip()] or ["(it said nothing more)"]
        parser.error(f"Apache Beam cannot read its flags: {lines[-1].split('error: ', 1)[-1]}")
    finally:
        beam_logger.setLevel(level)
    beam_dry_run = str(options.view_as(TestOptions).dry_run).lower() not in ("false", "0", "")
    if beam_dry_run and job.is_local(options) and not placeholders:
        parser.error("--dry_run is Apache Beam's (on Dataflow: build and validate the job, submit nothing) and "
                     "this runner would render for real: for placeholder images without a model, write --dry-run")
    ours = {flag[2:].replace("-", "_"): flag for action in parser._actions for flag in action.option_strings
            if flag.startswith("--")}
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, ours, n=1, cutoff=0.75)
        if close:
            parser.error(f"--{name}: did you mean {ours[close[0]]}? (neither jaxdiff nor Apache Beam knows --{name})")
        beams = [flag for flag in parsers[0]._option_string_actions if flag.startswith("--")]
        close = difflib.get_close_matches(f"--{name}", beams, n=1, cutoff=0.75)
        hint = f"did you mean Beam's {close[0]}? " if close else ""
        parser.error(f"--{name}: {hint}Neither jaxdiff nor Apache Beam knows this flag (jaxdiff render --help "
                     f"lists jaxdiff's; the rest go to Beam as pipeline options)")
    return job.is_local(options)


@contextlib.contextmanager
def _exit_on_interrupt():
    """Ctrl-C ends the command and its worker processes at once. Beam's cleanup after an
    interrupt can wait forever for its workers (--direct_running_mode=multi_processing),
    which then outlive the command, and its traceback says nothing useful. Ending so is
    safe, as after a kill: a shard counts only once its marker is written, after its files.
    Yields the call that gives Ctrl-C back to Python: a remote runner's job goes on without
    this command, which then only says so (render_command). The command's temporary files
    (Beam's pipeline folder, its workers') go to a folder of its own, removed however it ends:
    an interrupt ends the process before Beam's cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    scratch = tempfile.mkdtemp(prefix="jaxdiff-render-")
    given_tmpdir, given_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = scratch  # TMPDIR: Beam's worker processes inherit it

    def stop(signum, frame):
        import psutil

        # Past this point the command says one thing: Beam's threads that see their workers
        # die would print tracebacks of it, so stderr goes to /dev/null and the message to
        # the terminal's own descriptor.
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        terminal = os.dup(2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        for worker in psutil.Process().children(recursive=True):  # Beam's worker processes
            with contextlib.suppress(psutil.Error):
                worker.kill()
        shutil.rmtree(scratch, ignore_errors=True)
        os.write(terminal, b"\njaxdiff render: interrupted. Committed shards are kept: rerun the same command "
                           b"to render the rest.\n")
        os._exit(EXIT_INTERRUPTED)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield lambda: signal.signal(signal.SIGINT, previous)
    finally:
        signal.signal(signal.SIGINT, previous)
        tempfile.tempdir = given_tempdir
        if given_tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = given_tmpdir
        shutil.rmtree(scratch, ignore_errors=True)


def render_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipelines import job
    from pipelines.manifest import ManifestError

    try:
        config = job.RenderConfig(
            model=args.model, upscaler=args.upscaler, width=args.width, height=args.height, steps=args.steps,
            sampler=args.sampler, guidance=args.guidance, seed=args.seed, image_format=args.image_format,
            negative_prompt=args.negative_prompt, strength=args.strength, clip_skip=args.clip_skip,
            upscale_steps=args.upscale_steps, upscale_sampler=args.upscale_sampler,
            upscale_guidance=args.upscale_guidance, noise_level=args.noise_level,
            quality=args.quality, keep_base=args.keep_base, shard_size=args.shard_size, dtype=args.dtype,
            variant=args.variant, dry_run=args.dry_run, batch_size=args.batch_size, dry_run_delay_s=args.dry_run_delay,
            compilation_cache=args.compilation_cache)
        summary = job.run(args.manifests, args.out, config, beam_args=beam_args, fresh=args.fresh,
                          retry_failures=args.retry_failures, progress=not args.no_progress)
    except (ManifestError, job.RunConflict, job.JobError, OSError, ValueError) as e:
        print(f"jaxdiff render: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # a remote runner's (a local one's ends in _exit_on_interrupt)
        print("\njaxdiff render: interrupted. A job submitted to a remote runner goes on without this "
              "command: cancel it there (on Dataflow: gcloud dataflow jobs cancel JOB_ID --region REGION), or let "
              "it finish and rerun the same command, which then writes index.json.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a failed pipeline: say what failed, keep the details in the log
        logging.getLogger("jaxdiff").debug("render failed", exc_info=True)
        print(f"jaxdiff render: error: the pipeline failed: {e.__class__.__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"jaxdiff render: {summary.text()}", file=sys.stderr)
    return EXIT_OK if summary.complete else EXIT_INCOMPLETE


def main(argv: list[str] | None = None) -> int:
    # jaxdiff needs only transformers' tokenizers: its advice that PyTorch is missing is noise.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = argparse.ArgumentParser(prog="jaxdiff", description="Offline latent-diffusion rendering in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    render = _render_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args: list[str] = []
    if argv and argv[0] == "render":
        ours, beam_args = _split_beam_flags(argv[1:], render)
        argv = ["render"] + ours
    args = parser.parse_args(argv)
    if args.command == "render":
        # An empty value (an unset shell variable, say) would quietly mean the default.
        empty = {"out": "an output folder, local or gs://",
                 "model": "a diffusers folder or Hub id, or leave --model out for the shipped model",
                 "upscaler": "an upscaler folder or Hub id, or none",
                 "variant": "a weight variant such as fp16, or leave --variant out",
                 "compilation_cache": "a local folder or gs://bucket/prefix, or leave --compilation-cache out"}
        for name, fix in empty.items():
            if getattr(args, name) is not None and not getattr(args, name).strip():
                render.error(f"--{name.replace('_', '-')} is empty: give {fix}")
        if args.dry_run_delay and not args.dry_run:
            render.error("--dry-run-delay applies to --dry-run only: add --dry-run, or leave the delay out")
    # Beam logs every bundle at INFO; the progress bar and summary say what matters.
    logging.basicConfig(level=logging.WARNING)
    # The job's own warnings read as the command's other messages, on this call's stderr.
    job_log = logging.getLogger("pipelines")
    job_log.handlers = [h for h in job_log.handlers if h.get_name() != "jaxdiff render"]
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("jaxdiff render")
    handler.setFormatter(logging.Formatter("jaxdiff render: warning: %(message)s"))
    job_log.addHandler(handler)
    job_log.propagate = False
    if args.command == "render":
        with _exit_on_interrupt() as python_interrupts:  # from the imports on (seconds before Beam starts)
            if not _check_beam_flags(beam_args, render, placeholders=args.dry_run):
                python_interrupts()
            return render_command(args, beam_args)
    parser.error(f"unknown command {args.command}")
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
