"""The stages of an encode, generic and unaware of file formats and layouts.

    decode_stage   items -> (item, (S, S, 3) uint8 | InputError), in worker threads (Pillow
                   releases the GIL), in input order
    batch_stage    -> chunks holding B decoded images each (failures kept in place)
    model_stage    chunk -> (B, T, D) embeddings, each batch split over the model threads
    WriteStage     hands each chunk and its embeddings to a callback in a background thread

``run.py`` wires them to a layout for the batch job; ``Encoder.encode`` runs the first three
for images given in Python.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import InputError

T = TypeVar("T")
Chunk = list[tuple[Any, "np.ndarray | InputError"]]  # (item, pixels or its error), in input order


def decode_stage(
    items: Iterable[T], load: Callable[[T], np.ndarray], workers: int, lookahead: int, name: Callable[[T], str] = str
) -> Iterator[tuple[T, np.ndarray | InputError]]:
    """Decode + resize ``items`` (jobs, or the API's images) in ``workers`` threads, in input order,
    at most ``lookahead`` images in flight: (item, (S, S, 3) uint8 pixels or the InputError).
    ``name(item)`` names it in the error of an unexpected exception."""
    def run(item: T) -> np.ndarray | InputError:
        try:
            return load(item)
        except InputError as e:
            return e
        except Exception as e:  # a decoder bug must not end the job: report this file, go on
            return InputError(name(item), "unreadable", f"{type(e).__name__}: {e}")

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="vitembed-decode")
    try:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(run, item)))
            if len(pending) >= lookahead:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:  # on an error or Ctrl-C downstream, drop the queued decodes instead of finishing them
        pool.shutdown(wait=True, cancel_futures=True)


def batch_stage(
    decoded: Iterable[tuple[T, np.ndarray | InputError]], batch_size: int
) -> Iterator[Chunk]:
    """Cut the decoded stream into chunks holding ``batch_size`` decoded images each
    (the last may hold fewer), failures kept in place so results stay in input order."""
    chunk: Chunk = []
    images = 0
    for what, item in decoded:
        chunk.append((what, item))
        if not isinstance(item, InputError):
            images += 1
            if images == batch_size:
                yield chunk
                chunk, images = [], 0
    if chunk:
        yield chunk


def model_stage(
    chunks: Iterable[Chunk], encoder: Callable[[Any], Any], workers: int, collate: Callable[[list], Any] = np.stack
) -> Iterator[tuple[Chunk, Any]]:
    """(chunk, embeddings (B, T, D), or None when the chunk holds no image), in input order.

    With ``workers`` > 1 each batch is cut into that many near-equal slices, run at
    once in as many threads (torch releases the GIL inside its ops), and joined:
    every core is busy to the last batch. Rows are independent, so the result is
    the same as one call on the whole batch. ``collate`` makes the batch from the decoded
    images (``Encoder.collate``: stacked, or a NaFlex ``PatchBatch``); a batch's result is a
    tensor, or a list type with ``join`` (``encoder.RaggedRows``).
    """
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vitembed-model") if workers > 1 else None
    try:
        for chunk in chunks:
            images = [item for _, item in chunk if not isinstance(item, InputError)]
            if not images:
                yield chunk, None
                continue
            pixels = collate(images)  # (B, S, S, 3) uint8, or a PatchBatch
            if pool is None or len(pixels) < 2:
                yield chunk, encoder(pixels)
                continue
            bounds = np.array_split(np.arange(len(pixels)), min(workers, len(pixels)))
            parts = list(pool.map(encoder, [pixels[int(b[0]): int(b[-1]) + 1] for b in bounds]))
            yield chunk, torch.cat(parts) if isinstance(parts[0], torch.Tensor) else type(parts[0]).join(parts)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class WriteStage:
    """The write stage in a background thread: writes and reports each batch, in input
    order, while the model computes the next. At most ``depth`` batches wait in its
    queue, so memory stays flat however many images there are. ``on_put`` (if given) is told
    the size of each batch as it is handed over, i.e. as its images leave the model."""

    def __init__(self, handle: Callable[[list, torch.Tensor | None], None], close: Callable[[], None], depth: int = 2,
                 on_put: Callable[[int], None] | None = None):
        self.handle, self.finish, self.on_put = handle, close, on_put
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="vitembed-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:  # after an error, drain without writing so put() never blocks for good
                try:
                    self.handle(*item)
                except BaseException as e:
                    self.error = e
        try:
            self.finish()
        except BaseException as e:
            self.error = self.error or e

    def put(self, chunk: list, embeddings: torch.Tensor | None) -> None:
        if self.on_put is not None:
            self.on_put(len(chunk))
        self.queue.put((chunk, embeddings))

    def close(self) -> None:
        """Wait for the queued batches and the last part; re-raise the stage's first error.
        Safe to call again (after a Ctrl-C that arrived while waiting)."""
        if not self.closing:
            self.closing = True
            self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
