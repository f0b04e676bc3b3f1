"""Engines: who decodes, runs the model and hands the embeddings to the layout's writer.

    local   threads in this process (``stages.py``): decode workers, model threads, a write thread
    ray     Ray Data: decode tasks and model actors across a cluster; the driver writes (``ray.py``)

An engine is a function ``run_jobs(todo, encoder, options, run)``: it encodes the jobs ``todo``
(``inputs.Job``, already planned, claimed and resumed by ``run.encode_plan``) and hands each
batch, in input order, to ``run.open_writer()`` (a ``stages.WriteStage`` over the run's layout sink),
as ``(chunk, embeddings)``: ``chunk`` the jobs with their decoded pixels or ``InputError``,
``embeddings`` the (B, ...) tensor of the chunk's images (or ``encoder.RaggedRows``; None when it
holds none). The layout, atomic writes, resume and ``failures.jsonl`` are the run's, so outputs of
one engine resume under another.
"""

from __future__ import annotations

import importlib

ENGINES = {"local": "local", "ray": "ray"}


def run_jobs(engine: str, todo, encoder, options, run) -> None:
    """Run ``todo`` on ``engine`` (one of ``ENGINES``; see the module docstring)."""
    module = importlib.import_module(f".{ENGINES[engine]}", __name__)
    module.run_jobs(todo, encoder, options, run)
