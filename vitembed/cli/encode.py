"""``vitembed encode``: plan, load the encoder, run, report; SIGTERM handled as Ctrl-C."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Annotated, Optional

import typer

from ..catalog import DEFAULT_MODEL
from ..console import StdoutClosed, say, stderr
from ..errors import UsageError, VitembedError
from .common import (DTYPE, ENGINE, FORMAT, POOL, SAVE_DTYPE, AsJson, CropPct, ImageSize, Interpolation, Mean, Model, Resize, Std,
                     Weights, _fail, _opt, _quiet_pillow, _stop_on_sigterm, command)

# The flags of `vitembed encode`, one line each; ModelOptions, EncodingOptions and RunOptions say what each means.
Inputs = Annotated[Optional[list[str]], typer.Argument(
    help="Image files, folders (searched recursively), WebDataset .tar shards (also as 'shards/{00000..00099}.tar'), "
         "or - to read paths from stdin.", metavar="INPUT", show_default=False)]
Out = Annotated[str, _opt("Output folder. Re-running the same command there resumes: finished outputs are kept.",
                          "--out", "-o", metavar="DIR")]
Seed = Annotated[int, _opt("Seed of --weights random (0 .. 2**63-1).", metavar="N", default_shown=True)]
Layer = Annotated[str, _opt(
    "Which tokens to save: last = the encoder's output after its final LayerNorm (transformers' last_hidden_state); "
    "N = the output of block N (1 .. depth), before that LayerNorm, so --layer 12 of a 12-block model is not 'last'; "
    "embeddings = patch embeddings + class token + position embedding, before block 1.",
    metavar="last|N|embeddings", default_shown=True)]
PoolOpt = Annotated[str, _opt(
    "none: all tokens (prefix tokens first, then the patches row by row); cls: the class token; mean: mean of the "
    "patch tokens; patch: the patch tokens only; head: the family's own image embedding (CLIP's projection, "
    "SigLIP's attention-pooling head; `vitembed models` says which have one).", metavar=POOL, default_shown=True)]
Normalize = Annotated[bool, _opt("Scale pooled vectors (--pool cls, mean or head) to unit L2 length.", "--normalize")]
FormatOpt = Annotated[str, _opt("File format: safetensors (tensor + metadata) or npy (tensor only).", "--format",
                                metavar=FORMAT, default_shown=True)]
BatchSize = Annotated[int, _opt("Images per model call.", metavar="N", default_shown=True)]
Device = Annotated[str, _opt("auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; a device named but absent "
                             "is an error.", metavar="DEVICE", default_shown=True)]
DTypeOpt = Annotated[str, _opt("Compute precision; auto: bfloat16 on CUDA devices that support it, float32 elsewhere; "
                               "int8 (CPU): the block linears with int8 weights and activations, for CPUs with VNNI or "
                               "AMX (outputs are still saved as --save-dtype).",
                                 metavar=DTYPE, default_shown=True)]
SaveDTypeOpt = Annotated[str, _opt("Precision of the saved embeddings (float16 and bfloat16 halve the disk).",
                                         metavar=SAVE_DTYPE, default_shown=True)]
Compile = Annotated[bool, _opt("Run the model through torch.compile: tens of seconds to start, for long jobs "
                               "(falls back to eager with a warning).", "--compile")]
Pack = Annotated[Optional[int], _opt("Write N embeddings per file (DIR/part-00000.safetensors, ...) with DIR/index.jsonl "
                                     "mapping each input to its part and row; for millions of images.", metavar="N")]
Workers = Annotated[Optional[int], _opt("Decode + resize threads [default: the usable cores].", metavar="N")]
Background = Annotated[str, _opt("Colour that transparent pixels are composited onto.", metavar="R,G,B", default_shown=True)]
AllowTruncated = Annotated[bool, _opt("Decode truncated files (the missing part grey) instead of refusing them.",
                                      "--allow-truncated")]
Null = Annotated[bool, _opt("Paths on stdin are NUL-separated (find -print0).", "--null", "-0")]
Overwrite = Annotated[bool, _opt("Encode again inputs whose outputs exist, also if made with other settings.",
                                 "--overwrite")]
FailFast = Annotated[bool, _opt("Stop at the first input that fails (the default goes on and lists failures).",
                                "--fail-fast")]
Shard = Annotated[Optional[str], _opt("Process only shard K (0-based) of N, chosen by a stable hash of each output "
                                      "path: run K = 0 .. N-1 on N machines into one DIR.", metavar="K/N")]
ListOnly = Annotated[bool, _opt("Print the planned input -> output pairs and exit, encoding nothing.", "--list")]
FastDecode = Annotated[bool, _opt("Decode JPEGs at a reduced scale (1/2 to 1/8, keeping at least twice the resize "
                                  "target) and resize in whole-factor steps first: several times faster on large "
                                  "photos, not exact (recorded in the metadata).", "--fast-decode")]
MaxPixels = Annotated[Optional[int], _opt("Refuse images with more pixels than this [default: 178956970, twice "
                                          "Pillow's MAX_IMAGE_PIXELS].", metavar="N")]
Verbose = Annotated[bool, _opt("With --list: also name the files a folder walk passed over as not images.",
                               "--verbose", "-v")]
FromTable = Annotated[Optional[list[str]], _opt("Read input paths from a table: .parquet (needs pyarrow), .csv or "
                                                ".jsonl; repeatable.", "--from-table", metavar="FILE")]
Column = Annotated[str, _opt("The --from-table column holding the paths.", metavar="NAME", default_shown=True)]
RelativeTo = Annotated[Optional[str], _opt("Name every output by its input's path relative to this folder, so a folder "
                                           "walk, stdin and a table give one file one output.", metavar="DIR")]
EngineOpt = Annotated[str, _opt("local: threads on this machine; ray: Ray Data on the cluster that --ray-address or "
                                   "$RAY_ADDRESS names (a local Ray instance when none).", "--engine", metavar=ENGINE,
                                default_shown=True)]
RayAddress = Annotated[Optional[str], _opt("--engine ray: the cluster's address [default: $RAY_ADDRESS, else a local "
                                           "Ray instance].", metavar="ADDRESS")]
Actors = Annotated[Optional[int], _opt("--engine ray: model actors [default: one per GPU; one CPU actor per node "
                                       "without GPUs].", metavar="N")]
DecodeCpus = Annotated[float, _opt("--engine ray: CPUs each decode task reserves.", metavar="CPUS", default_shown=True)]
ActorCpus = Annotated[Optional[float], _opt("--engine ray: CPUs each model actor reserves [default: 1 with a GPU; "
                                            "else the node's CPUs less one decode task].", metavar="CPUS")]
LogEvery = Annotated[float, _opt("When stderr is not a terminal (a batch log): a progress line every this many "
                                 "seconds; 0: none.", metavar="SECONDS", default_shown=True)]
Quiet = Annotated[bool, _opt("No panel or progress on stderr (warnings, errors and the summary line stay).",
                             "--quiet", "-q")]

EPILOG = """Examples:
  vitembed encode photos/ --out emb/ --model dinov2-small
  vitembed encode photos/ --out vec/ --pool cls --normalize --pack 10000
  find /data -name '*.jpg' -print0 | vitembed encode -0 - --out emb/
  vitembed encode photos/ --out emb/ --weights random     # no weights needed

Weights, when --weights is not given, are looked for in this order:
  $VITEMBED_WEIGHTS, ./weights/NAME/, the Hugging Face cache, then the Hub
  (a download; not with HF_HUB_OFFLINE=1, which a machine without network
  should set).

Exit status:
  0    every input encoded or already done
  1    some inputs failed (named on stderr and in DIR/failures.jsonl;
       the others are written)
  2    usage or setup error: bad option, no weights, DIR holds outputs
       of other settings; nothing encoded
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM)
Outputs already written are always whole: the same command resumes."""


@command("Images to embedding files: one per image, or N per file with --pack.", EPILOG)
def encode(
    out_dir: Out, inputs: Inputs = None, model: Model = DEFAULT_MODEL, weights: Weights = None, seed: Seed = 0,
    layer: Layer = "last", pool: PoolOpt = "none", normalize: Normalize = False, image_size: ImageSize = None, resize: Resize = None,
    interpolation: Interpolation = None, crop_pct: CropPct = None, mean: Mean = None, std: Std = None,
    fmt: FormatOpt = "safetensors", batch_size: BatchSize = 32, device: Device = "auto", dtype: DTypeOpt = "auto",
    save_dtype: SaveDTypeOpt = "float32", compile: Compile = False, pack: Pack = None, workers: Workers = None,
    background: Background = "255,255,255", allow_truncated: AllowTruncated = False, null: Null = False,
    overwrite: Overwrite = False, fail_fast: FailFast = False, shard: Shard = None, list_only: ListOnly = False,
    max_pixels: MaxPixels = None, fast_decode: FastDecode = False, from_table: FromTable = None, column: Column = "path", relative_to: RelativeTo = None,
    engine: EngineOpt = "local", ray_address: RayAddress = None, actors: Actors = None, decode_cpus: DecodeCpus = 1.0,
    actor_cpus: ActorCpus = None, as_json: AsJson = False, verbose: Verbose = False, quiet: Quiet = False,
    log_every: LogEvery = 30.0,
) -> None:
    """Encode images into embeddings under --out: one file per image (DIR/cat.jpg.safetensors holding a
    (tokens, hidden) float32 tensor and how it was made), or N per file with --pack N."""
    from .. import console
    from ..options import EncodingOptions, ModelOptions, RayOptions, RunOptions

    _quiet_pillow()
    terminated = _stop_on_sigterm()
    try:
        if not 0 <= log_every <= 10**6:
            raise UsageError(f"--log-every {log_every}: must be a number of seconds from 0 (no progress lines) "
                             "to 1000000")
        inputs, stdin_paths = _stdin_inputs(inputs or [], null, from_table or [], column)
        given = [flag for flag, value in (("--ray-address", ray_address), ("--actors", actors), ("--actor-cpus", actor_cpus),
                                          ("--decode-cpus", None if decode_cpus == 1.0 else decode_cpus)) if value is not None]
        if given and engine != "ray":
            raise UsageError(f"{', '.join(given)}: for --engine ray only (this run's engine is {engine})")
        options = ModelOptions(model=model, weights=weights, seed=seed, image_size=image_size, resize=resize,
                               interpolation=interpolation, crop_pct=crop_pct, mean=mean, std=std, device=device,
                               dtype=dtype, compile=compile)
        encoding = EncodingOptions(layer=layer, pool=pool, normalize=normalize, save_dtype=save_dtype, background=background,
                                   allow_truncated=allow_truncated, max_pixels=max_pixels, fast_decode=fast_decode)
        run = RunOptions(format=fmt, pack=pack, batch_size=batch_size, workers=workers, overwrite=overwrite,
                         fail_fast=fail_fast, shard=shard, relative_to=relative_to, engine=engine,
                         ray=RayOptions(address=ray_address, actors=actors, decode_cpus=decode_cpus, actor_cpus=actor_cpus))
        summary, encoder, out_dir = _encode(inputs, stdin_paths, out_dir, options, encoding, run,
                                            list_only=list_only, as_json=as_json, verbose=verbose, quiet=quiet,
                                            log_every=log_every)
    except VitembedError as e:
        raise _fail(str(e), e.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; the outputs already written are complete", 143 if terminated else 130) from None
    except StdoutClosed:  # `| head`: cli.main exits 141; the summary line would be lost with it
        say("stopped: stdout was closed by its reader; the outputs already written are complete "
            "(run the same command again to resume)")
        raise
    if summary is None:  # --list, or nothing to do
        return
    console.print_summary(stderr(quiet), summary, encoder, out_dir, bool(terminated))
    if summary.interrupted:
        raise typer.Exit(143 if terminated else 130)
    if summary.failed or summary.log_errors:  # a log or index that could not be written: not all good
        raise typer.Exit(1)


def _encode(inputs, stdin_paths, out_dir, options, encoding, run, *, list_only: bool, as_json: bool, verbose: bool, quiet: bool,
            log_every: float):
    """Plan, then (unless ``--list`` or nothing to do) load the encoder and run: (summary, encoder, DIR)."""
    from .. import console
    from ..outdir import check_out_dir
    from ..run import plan_run

    plan, layout = plan_run(inputs, out_dir, run, encoding.save_dtype, stdin_paths)  # refuses an empty --out
    if list_only:
        console.print_plan(plan, as_json, run.pack, verbose)
        if plan.problems:
            raise typer.Exit(1)
        return None, None, plan.out_dir
    check_out_dir(plan.out_dir)
    if not len(plan):
        found = f" ({console.passed_over_line(len(plan.passed_over))})" if plan.passed_over else ""
        say(f"warning: no image files found among the inputs{found}; nothing to do")
        return None, None, plan.out_dir
    from ..encoder import Encoder  # imports torch
    from ..progress import Progress
    from ..run import encode_plan
    from ..runtime import usable_cores

    err = stderr(quiet)
    if quiet:
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    cluster = None
    if run.engine == "ray":  # reach the cluster (and lay out the actors) before loading anything
        from ..engines.ray import connect

        cluster = connect(run.ray)
    encoder = Encoder(options=options, encoding=encoding, progress=not quiet and err.is_terminal, defer_model=True)
    console.start_panel(err, encoder, run.workers or usable_cores(), plan.out_dir, run.pack, cluster, dtype_asked=options.dtype)
    progress = Progress(len(plan))
    with console.ProgressDisplay(err, progress, log_every):
        summary = encode_plan(plan, encoder, layout, run, console.EncodeReport(err, as_json), progress)
    return summary, encoder, plan.out_dir



def _stdin_inputs(inputs: list[str], null: bool, tables: list[str] = (), column: str = "path"):
    """(the inputs without ``-``, the paths read from stdin when ``-`` is among them, then those of
    the ``--from-table`` tables, read as planning goes)."""
    import itertools

    from ..inputs import read_path_list

    if null and "-" not in inputs:
        raise UsageError("-0/--null applies to paths read from stdin: add - to the inputs "
                         "(find DIR -print0 | vitembed encode -0 - --out OUT)")
    if not inputs and not tables:
        raise UsageError("no inputs: name image files, folders or .tar shards, - for paths on stdin, or --from-table FILE")
    from ..tables import read_table_paths

    rows: Iterable[str] = itertools.chain.from_iterable(read_table_paths(table, column) for table in tables)
    if "-" not in inputs:
        return inputs, rows
    return [i for i in inputs if i != "-"], itertools.chain(read_path_list(sys.stdin.buffer, null_separated=null), rows)
