"""The local engine: decode worker threads, model threads and a write thread in this process."""

from __future__ import annotations

import torch

from ..preprocess import load_pixels
from ..runtime import usable_cores
from ..stages import batch_stage, decode_stage, model_stage


def run_jobs(todo, encoder, options, run) -> None:
    """Decode (``options.workers`` threads), batch, encode (``encoder.thread_layout``) and write
    ``todo`` (the write in ``run.writer``'s thread); see ``engines``."""
    pre, decode = encoder.preprocess_config, encoder.encoding.decode
    run.open_writer()
    model_threads, torch_threads = encoder.thread_layout()
    torch.set_num_threads(torch_threads)  # per model thread; restored by the caller
    decoded = decode_stage(todo, lambda job: load_pixels(job.image, pre, decode), options.workers or usable_cores(),
                           lookahead=2 * options.batch_size, name=lambda job: job.source)
    batches = model_stage(batch_stage(decoded, options.batch_size), encoder, model_threads, encoder.collate)
    try:
        for chunk, embeddings in batches:
            run.writer.put(chunk, embeddings)  # (B, T, D)
            if run.writer.error is not None or run.summary.stopped:
                break
    finally:  # stop the decode and model threads now, also on an error or Ctrl-C
        batches.close()
        decoded.close()
    run.writer.close()
    run.writer = None
