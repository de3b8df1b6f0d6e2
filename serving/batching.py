"""Adaptive batching: the images that queue up while the model is busy run together in its next call."""

from __future__ import annotations

import asyncio
from typing import Callable

import anyio
import numpy as np


class Batcher:
    """The uint8 [n, C, H, W] jobs that queue up while the model is busy run together as one model call of at
    most `max_images` images (a larger job runs alone). An idle model takes a job at once, so batches grow with
    the load and a lone request waits for nothing. One call runs at a time, in a worker thread (onnxruntime
    releases the GIL, so the event loop goes on reading and decoding the next requests meanwhile), except a call
    of at most `loop_images` images, which runs on the event loop itself: for a fast model a lone image costs
    less than the thread hop and the GIL hand-over back."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_images: int, loop_images: int = 0):
        self.run, self.max_images, self.loop_images = run, max_images, loop_images
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """The model's output for `pixels`, computed in some batch."""
        if self.worker is None:  # start in the server's event loop, on first use
            self.queue = asyncio.Queue()
            self.worker = asyncio.create_task(self.work())
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((pixels, future))
        return await future

    async def work(self) -> None:
        waiting = None
        while True:
            jobs = [waiting or await self.queue.get()]
            waiting, size = None, len(jobs[0][0])
            while not self.queue.empty():
                job = self.queue.get_nowait()
                if size + len(job[0]) > self.max_images:
                    waiting = job
                    break
                jobs.append(job)
                size += len(job[0])
            jobs = [(pixels, future) for pixels, future in jobs if not future.done()]  # drop requests gone
            if not jobs:
                continue
            batch = jobs[0][0] if len(jobs) == 1 else np.concatenate([pixels for pixels, _ in jobs])
            try:
                if len(batch) <= self.loop_images:
                    outputs = self.run(batch)
                else:
                    outputs = await anyio.to_thread.run_sync(self.run, batch)
            except Exception as exc:  # the model failed: every job in the batch gets the error, the loop goes on
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for pixels, future in jobs:
                if not future.done():
                    future.set_result(outputs[start:start + len(pixels)])
                start += len(pixels)
