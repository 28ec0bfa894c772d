"""A daemon thread as an executor (see DaemonThread)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Executor, Future


class DaemonThread(Executor):
    """One thread that runs what is submitted, one call at a time, in order. A daemon, unlike
    ThreadPoolExecutor's (asyncio.to_thread's), whose threads the interpreter joins at exit: a call
    hung in a driver or on a disk would have held the stopping process until its supervisor
    killed it. For the NVML agent's calls and the dead-letter files' writes."""

    def __init__(self, name: str) -> None:
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._closed:
            raise RuntimeError(f"{self._thread.name}: shut down")
        future: Future = Future()
        self._work.put((future, fn, args, kwargs))
        return future

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            future, fn, args, kwargs = work
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # the caller's to see, as ThreadPoolExecutor would
                    future.set_exception(e)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        self._work.put(None)
        if wait:
            self._thread.join()
