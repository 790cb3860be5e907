"""The training step's batches, made ahead on a background thread and pinned for asynchronous copies.

    stream = Prefetcher(loader, depth=2 * grad_accum_steps, pin=torch.cuda.is_available())
    batch = next(stream)            # host tensors (pinned): .to(device, non_blocking=True) returns at once
    state = stream.state_dict()     # the loader's position after the last batch TAKEN, not the last made

The loader's host work (Parquet rows -> float16 tensors, no sampling or conversion) then runs while the GPU computes
the previous micro-batches instead of between them: numpy and torch release the GIL in that work. A
copy from pinned memory is a DMA the GPU schedules itself; from pageable memory it would block the
host. The thread runs epoch after epoch until close(); an error in it is raised by the next `next()`.
One stream per loader at a time: the thread moves the loader's position.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from pipelines.data.loader import FeatureLoader


class Prefetcher:
    def __init__(self, loader: FeatureLoader, depth: int, pin: bool) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.loader, self.pin = loader, pin
        self._state = loader.state_dict()  # nothing taken yet: where the loader stands now
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                for batch in self.loader:  # the rest of this epoch, then the next one
                    state = self.loader.state_dict()  # a checkpoint after this batch resumes here
                    if self.pin:
                        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    if not self._put((state, batch)):
                        return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(err)

    def _put(self, item: Any) -> bool:
        """Block while the queue is full; False once close() was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> dict[str, Any]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._state, batch = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def close(self) -> None:
        """Stop the thread (after the batch it is making), then move the loader back to the batches
        taken: a new stream over it continues with the next batch, none skipped."""
        self._stop.set()
        self._thread.join()
        self.loader.load_state_dict(self._state)
