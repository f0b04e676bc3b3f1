"""The ``vitembed`` command: a thin layer over the Python API.

Parses options, calls the library, turns its errors into one line on stderr and
an exit status (0 all good, 1 some inputs failed, 2 usage or setup error).
stdout carries only machine output (``--json``: one object per line); the start
panel, progress bar, warnings and summary go to stderr, without colour or bar
when stderr is not a terminal, under ``--quiet`` or with ``NO_COLOR``.
Importing this module does not import torch.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .catalog import CATALOG, DEFAULT_MODEL
from .errors import InputError, VitembedError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Turn image files into Vision Transformer embeddings (197x768 tokens per image for ViT-B/16).",
)


class Format(str, Enum):
    safetensors = "safetensors"
    npy = "npy"


class Pool(str, Enum):
    none = "none"
    cls = "cls"
    mean = "mean"
    patch = "patch"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class SaveDType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class _StdoutClosed(Exception):
    """stdout was closed by its reader (``| head``). Not an OSError, so that click does not turn it
    into exit 1: ``main`` exits 141, as a process killed by SIGPIPE does."""


def _out(text: str, flush: bool = False) -> None:
    """Machine output on stdout."""
    try:
        sys.stdout.write(text)
        if flush:
            sys.stdout.flush()
    except BrokenPipeError:
        raise _StdoutClosed() from None


def _stderr(quiet: bool = False) -> Console:
    return Console(stderr=True, quiet=quiet, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 2) -> "typer.Exit":
    _stderr().print(f"error: {message}", markup=False)
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vitembed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command()
def encode(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Image files, directories (searched recursively), or - for paths on stdin.", show_default=False),
    ],
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Output directory.", show_default=False)],
    model: Annotated[str, typer.Option(help=f"Model name ({', '.join(CATALOG)}).")] = DEFAULT_MODEL,
    weights: Annotated[
        Optional[str],
        typer.Option(
            help="Checkpoint directory (config.json + model.safetensors or pytorch_model.bin), "
            "a .safetensors/.bin file (architecture from --model), or 'random'.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Seed for --weights random.")] = 0,
    layer: Annotated[str, typer.Option(help="last | embeddings | N (output of block N, 1..depth).")] = "last",
    pool: Annotated[
        Pool, typer.Option(help="none: all tokens; cls: class token; mean: mean of patch tokens; patch: patch tokens.")
    ] = Pool.none,
    image_size: Annotated[
        Optional[int],
        typer.Option(help="Input size in pixels; the position embedding is resampled [default: the model's preprocessing size].", show_default=False),
    ] = None,
    resize: Annotated[
        Optional[str], typer.Option(help="Override the model's resize: squash | shortest.", show_default=False)
    ] = None,
    interpolation: Annotated[
        Optional[str], typer.Option(help="Override the resampling filter: bilinear, bicubic, ...", show_default=False)
    ] = None,
    crop_pct: Annotated[
        Optional[float], typer.Option(help="timm's crop_pct: resize to size/crop_pct, then centre-crop.", show_default=False)
    ] = None,
    mean: Annotated[Optional[str], typer.Option(help="Override the normalisation mean: R,G,B.", show_default=False)] = None,
    std: Annotated[Optional[str], typer.Option(help="Override the normalisation std: R,G,B.", show_default=False)] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output file format.")] = Format.safetensors,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps.")] = "auto",
    dtype: Annotated[
        DType, typer.Option(help="Compute precision; auto: bfloat16 on CUDA devices that support it, float32 elsewhere.")
    ] = DType.auto,
    save_dtype: Annotated[
        SaveDType, typer.Option(help="Precision of the saved embeddings (float16/bfloat16 halve the disk).")
    ] = SaveDType.float32,
    compile: Annotated[
        bool, typer.Option("--compile", help="Run the model through torch.compile (falls back to eager with a warning).")
    ] = False,
    pack: Annotated[
        Optional[int],
        typer.Option(min=1, help="Write N embeddings per file (DIR/part-00000.safetensors) plus DIR/index.jsonl.", show_default=False),
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option(min=1, help="Decode + resize threads [default: usable cores].", show_default=False)
    ] = None,
    background: Annotated[
        str, typer.Option(help="R,G,B colour that transparent pixels are composited onto.")
    ] = "255,255,255",
    allow_truncated: Annotated[
        bool, typer.Option(help="Decode truncated files (missing part grey) instead of refusing them.")
    ] = False,
    null: Annotated[bool, typer.Option("--null", "-0", help="Paths on stdin are NUL-separated (find -print0).")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Re-encode inputs whose outputs exist, also if made with other settings.")
    ] = False,
    fail_fast: Annotated[bool, typer.Option(help="Stop at the first input that fails.")] = False,
    shard: Annotated[
        Optional[str],
        typer.Option(help="K/N: process only shard K (0-based) of N, by a stable hash of each output path.", show_default=False),
    ] = None,
    list_only: Annotated[
        bool, typer.Option("--list", help="Print the planned input -> output pairs and exit, encoding nothing.")
    ] = False,
    max_pixels: Annotated[
        Optional[int],
        typer.Option(min=1, help="Refuse images with more pixels than this [default: 178956970, twice Pillow's MAX_IMAGE_PIXELS].", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per input on stdout.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="With --list: also name the files a folder walk passed over as not images.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No panel or progress on stderr (warnings, errors and the summary line stay).")
    ] = False,
) -> None:
    """Encode images into embeddings under --out: one file per image, or N per file with --pack N."""
    from .errors import UsageError, printable, shown
    from .inputs import plan_jobs, read_path_list
    from .writers import check_format, check_out_dir

    import warnings

    from PIL import Image

    # vitembed refuses images over the pixel limit itself, with a message naming the file.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    # Pillow warns about what it repairs (a corrupt EXIF block); the image is still good.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    err = _stderr(quiet)
    stdin_paths: list[str] = []
    if null and "-" not in inputs:
        raise _fail("-0/--null applies to paths read from stdin: add - to the inputs "
                    "(find DIR -print0 | vitembed encode -0 - --out OUT)", 2)
    if "-" in inputs:
        stdin_paths = read_path_list(sys.stdin.buffer, null_separated=null)
        inputs = [i for i in inputs if i != "-"]
    warnings.showwarning = _show_warning
    import signal

    terminated: list[bool] = []

    def on_sigterm(signum, frame) -> None:  # stop as Ctrl-C does: whole outputs, the counts, resumable
        terminated.append(True)
        raise _Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if pack is not None and fmt != Format.safetensors:
            raise UsageError("--pack writes safetensors part files; it cannot be used with --format npy")
        check_format(fmt.value, save_dtype.value)
        decode = _decode_options(background, max_pixels, allow_truncated)
        plan = plan_jobs(inputs, out_dir, fmt.value, stdin_paths)  # refuses an empty --out
        out = plan.out_dir
        if shard is not None:
            plan = plan.shard(*_parse_shard(shard))
        if list_only:
            _print_plan(plan, as_json, pack, verbose)
            if plan.problems:
                raise typer.Exit(1)
            return
        check_out_dir(out)
        if not len(plan):
            found = f" ({_passed_over_line(len(plan.passed_over))})" if plan.passed_over else ""
            _stderr().print(f"warning: no image files found among the inputs{found}; nothing to do", markup=False)
            return
        from . import pipeline  # imports torch
        from .progress import EncodeProgress, start_panel

        if quiet:
            from huggingface_hub.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        if weights == "random":
            _stderr().print(
                "warning: --weights random: the model has random weights; its embeddings carry no meaning.",
                markup=False,
            )
        encoder = pipeline.load_encoder(
            model=model,
            weights=weights,
            seed=seed,
            layer=layer,
            device=device,
            dtype=dtype.value,
            save_dtype=save_dtype.value,
            pool=pool.value,
            image_size=image_size,
            preprocess=dict(
                resize=resize,
                interpolation=interpolation,
                crop_pct=crop_pct,
                mean=_triple(mean, "--mean"),
                std=_triple(std, "--std"),
            ),
            progress=not quiet and err.is_terminal,
            compile=compile,
        )
        start_panel(err, encoder, workers or pipeline.usable_cores(), out, pack)
        failed_lines = _stderr()
        with EncodeProgress(err, total=len(plan), enabled=not quiet) as progress:

            def on_result(result: "pipeline.Result") -> None:
                if result.error is not None:
                    failed_lines.print(f"failed: {result.error}", markup=False)
                elif result.reason is not None and result.output is None:  # a repeat, not "already done"
                    err.print(f"skipped: {shown(result.source)}: {result.reason}", markup=False)
                if as_json:
                    line = {"source": printable(result.source), "status": result.status, "output": None}
                    if result.output is not None:
                        line["output"] = printable(result.output)
                    if result.row is not None:
                        line.update(key=result.key, row=result.row)
                    if result.error is not None:
                        line.update(error_kind=result.error.kind, error=result.error.reason)
                    if result.reason is not None:
                        line["reason"] = result.reason
                    _out(json.dumps(line, ensure_ascii=False) + "\n", flush=True)
                progress.advance()

            summary = pipeline.encode_jobs(
                plan,
                encoder,
                fmt=fmt.value,
                batch_size=batch_size,
                workers=workers,
                decode=decode,
                on_result=on_result,
                overwrite=overwrite,
                fail_fast=fail_fast,
                pack=pack,
            )
    except VitembedError as e:
        raise _fail(str(e), e.exit_code) from None
    except KeyboardInterrupt as e:
        code = 143 if isinstance(e, _Terminated) else 130
        raise _fail("interrupted; the outputs already written are complete", code) from None
    for problem in dict.fromkeys(summary.log_errors):
        _stderr().print(f"warning: {problem}", markup=False)
    if summary.nonfinite:
        _stderr().print(
            f"warning: {summary.nonfinite} embeddings hold Inf or NaN values"
            + (f" (--dtype {encoder.dtype_name} overflow? try --dtype float32)" if encoder.dtype_name == "float16" else "")
            + (" (--save-dtype float16 overflow? try float32 or bfloat16)" if save_dtype == SaveDType.float16 else ""),
            markup=False,
        )
    if summary.passed_over:
        err.print(_passed_over_line(summary.passed_over) + " (vitembed encode --list --verbose names them)", markup=False)
    if summary.failed and not summary.log_errors:
        err.print(f"failures are listed in {shown(out / 'failures.jsonl')}", markup=False)
    if summary.stopped:
        err.print("stopped at the first failure (--fail-fast)", markup=False)
    if summary.interrupted:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        _stderr().print(f"{how}: the outputs already written are complete; run again to resume", markup=False)
    _stderr().print(  # the last line, even under --quiet: the counts a batch log needs
        f"encoded {summary.encoded}, skipped {summary.skipped}, failed {summary.failed} in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.1f} images/s) -> {shown(out)}",
        markup=False,
    )
    if summary.interrupted:
        raise typer.Exit(143 if terminated else 130)
    if summary.failed or summary.log_errors:  # a log or index that could not be written: not all good
        raise typer.Exit(1)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit or scancel), handled as Ctrl-C is."""


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (vitembed's own, torch's) as one ``warning:`` line on stderr, not a source excerpt."""
    _stderr().print(f"warning: {message}", markup=False)


def _decode_options(background: str, max_pixels: int | None, allow_truncated: bool):
    from .decode import DecodeOptions
    from .errors import UsageError

    try:
        rgb = tuple(int(v) for v in background.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise UsageError(f"--background {background!r}: expected R,G,B with values 0..255, e.g. 255,255,255")
    # decode.open_image applies the limit itself (None: its default) and lifts Pillow's own refusal.
    return DecodeOptions(max_pixels=max_pixels, background=rgb, allow_truncated=allow_truncated)  # type: ignore[arg-type]


def _triple(text: str | None, option: str) -> tuple[float, float, float] | None:
    from .errors import UsageError

    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UsageError(f"{option} {text!r}: expected three numbers R,G,B, e.g. 0.485,0.456,0.406")
    return values  # type: ignore[return-value]


def _parse_shard(text: str) -> tuple[int, int]:
    from .errors import UsageError

    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected K/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= k < n):
        raise UsageError(f"--shard {text!r}: expected K/N with 0 <= K < N")
    return k, n


def _print_plan(plan, as_json: bool, pack: int | None = None, verbose: bool = False) -> None:
    """``--list``: one line per planned input on stdout: source TAB output, or with ``--pack``
    source TAB its key in index.jsonl (control characters escaped as on stderr, ``errors.shown``) (JSON: ``{"source", "output"}`` or ``{"source", "key"}``).
    Files a folder walk passed over are counted on stderr, named there with ``verbose``, and are
    lines ``{"source", "status": "passed-over", "reason"}`` on stdout with ``--json``."""
    from .errors import printable, shown

    for job in plan.jobs:  # the tab-separated lines escape control characters (a name cannot break a line)
        name, where = ("key", job.key) if pack else ("output", printable(job.output))
        _out(json.dumps({"source": printable(job.source), name: where}) + "\n" if as_json else f"{shown(job.source)}\t{shown(where)}\n")
    for path in plan.passed_over:
        if as_json:
            _out(json.dumps({"source": printable(path), "status": "passed-over", "reason": "not an image by name"}) + "\n")
        elif verbose:
            _stderr().print(f"passed over: {shown(path)} (not an image by name)", markup=False)
    for problem in plan.problems:
        _stderr().print(f"failed: {problem}", markup=False)
    if plan.passed_over and not as_json:
        _stderr().print(_passed_over_line(len(plan.passed_over)) + ("" if verbose else " (--verbose names them)"), markup=False)


def _passed_over_line(count: int) -> str:
    return f"passed over {count} files that are not images by name" if count != 1 else "passed over 1 file that is not an image by name"


@app.command()
def inspect(
    files: Annotated[list[Path], typer.Argument(help=".safetensors or .npy files written by encode.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per file on stdout.")] = False,
) -> None:
    """Show tensor names, shapes, dtypes, metadata and statistics of output files."""
    from .errors import shown
    from .inspect import inspect_file

    out = Console(highlight=False, soft_wrap=True)
    failed = 0
    for file in files:
        try:
            info = inspect_file(file)
        except InputError as e:
            failed += 1
            _stderr().print(f"error: {e}", markup=False)
            continue
        except Exception as e:  # one odd file must not hide the others
            failed += 1
            _stderr().print(f"error: {shown(file)}: cannot inspect: {type(e).__name__}: {e}", markup=False)
            continue
        if as_json:
            _out(json.dumps(info, ensure_ascii=False) + "\n")
            continue
        out.print(f"{shown(info['path'])} ({info['format']})", markup=False)
        for t in info["tensors"]:
            s = t["stats"]
            out.print(f"  tensor {t['name']}: shape {tuple(t['shape'])} {t['dtype']}", markup=False)
            out.print(
                "    "
                + "  ".join(
                    f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {'-' if v is None else v}"
                    for k, v in s.items()
                ),
                markup=False,
            )
        if info["metadata"]:
            out.print("  metadata:", markup=False)
            width = max(map(len, info["metadata"]))
            for key, value in sorted(info["metadata"].items()):
                if len(value) > 200:  # a pack's keys/sources lists: --json has them whole
                    value = f"{value[:160]}... ({len(value)} characters; --json shows all)"
                out.print(f"    {shown(key):<{width}}  {shown(value)}", markup=False)
    if failed:
        raise typer.Exit(1)


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="One JSON object per model on stdout.")] = False) -> None:
    """List the known model names."""
    for spec in CATALOG.values():
        cfg, pre = spec.config(), spec.preprocess
        row = {
            "name": spec.name,
            "family": spec.family,
            "repo": spec.repo,
            "variant": spec.variant,
            "tokens": cfg.num_tokens,
            "hidden_size": cfg.hidden_size,
            "image_size": pre.image_size,
            "prefix_tokens": cfg.num_prefix_tokens,
            "resize": pre.resize,
            "resize_size": pre.resize_to,
            "crop": pre.crop,
            "interpolation": pre.interpolation,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "description": spec.description,
        }
        if as_json:
            _out(json.dumps(row) + "\n")
        else:
            typer.echo(
                f"{spec.name:<34} {spec.family:<5} {spec.variant:<6} {cfg.num_tokens}x{cfg.hidden_size:<5} "
                f"{pre.resize} {pre.resize_to}{f' crop {pre.image_size}' if pre.crop else ''} {pre.interpolation} "
                f"mean={list(pre.mean)} std={list(pre.std)}  {spec.repo}"
            )


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except (BrokenPipeError, _StdoutClosed):  # `vitembed ... --json | head`: stop quietly, as SIGPIPE would (128 + 13)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)
