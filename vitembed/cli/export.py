"""``vitembed export``: the pooled vectors of a folder of outputs as one .npy or .parquet file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import _fail, _opt, _quiet_pillow, _stop_on_sigterm, command



EXPORT_EPILOG = """Examples:
  vitembed export emb/ vectors.npy --pool cls --normalize
  vitembed export emb/ vectors.parquet --pool mean

Exit status: 0 written; 2 nothing written (a bad folder, mixed shapes, an
unreadable output, token outputs without --pool): OUT appears whole or not
at all."""


@command("Pooled vectors of a folder to one .npy or .parquet file for search.", EXPORT_EPILOG)
def export(
    emb: Annotated[Path, typer.Argument(help="A folder of outputs: per-image files, or a --pack folder.", metavar="EMB", show_default=False)],
    out: Annotated[Path, typer.Argument(help="OUT.npy (plus OUT.keys.jsonl) or OUT.parquet.", metavar="OUT", show_default=False)],
    pool: Annotated[Optional[str], _opt("How to pool token outputs (encoded with --pool none or patch): cls (token 0) or mean (of the patch tokens).", metavar="cls|mean")] = None,
    normalize: Annotated[bool, _opt("L2-normalise each vector to unit length.", "--normalize")] = False,
    as_json: Annotated[bool, _opt('Print {"rows", "dim", "out", "keys"} on stdout.', "--json")] = False,
) -> None:
    """Write the pooled vectors of EMB to one file that search tools read (FAISS, DuckDB, LanceDB)."""
    import json

    from ..console import out as stdout
    from ..console import say
    from ..errors import VitembedError, shown
    from ..export import export_vectors

    _quiet_pillow()  # warnings as one `warning:` line
    terminated = _stop_on_sigterm()
    try:
        done = export_vectors(emb, out, pool=pool, normalize=normalize)
    except VitembedError as e:
        raise _fail(str(e), e.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; nothing was written", 143 if terminated else 130) from None
    say(f"exported {done.rows} vector{'' if done.rows == 1 else 's'} of {done.dim} to {shown(done.out)}" + (f" (keys: {shown(done.keys)})" if done.keys else ""))
    if as_json:
        stdout(json.dumps({"rows": done.rows, "dim": done.dim, "out": done.out, "keys": done.keys}, ensure_ascii=False) + "\n")
