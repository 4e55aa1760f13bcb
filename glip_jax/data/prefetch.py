"""Host→device double-buffering: keep N global batches already on the devices, checkpoint-safe.

`DevicePrefetch(host_iterator, mesh, size=2)` wraps the (Grain) training iterator: a background
thread takes local numpy batches from it, turns them into global `jax.Array`s
(`pipeline.make_global_batch`, i.e. `jax.make_array_from_process_local_data`, whose host→device
copy is asynchronous) and keeps up to `size` of them queued, so the copy of batch k+1 overlaps
step k and `next()` costs a queue pop.

Checkpointing: the producer records the host iterator's state right after each batch it takes,
and the batch travels with that state. `get_state()` returns the state stored with the last batch
handed out (or the state at construction/restore), i.e. the position after the batches *consumed*,
not after the ones prefetched. Restoring that state re-produces the prefetched-but-unconsumed
batches exactly, because the host pipeline is deterministic given its state. It is a
`grain.DatasetIterator`, so `grain.checkpoint.CheckpointSave/Restore` (Orbax) work unchanged.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable
from typing import Any

import grain
import jax
from jax.sharding import Mesh

from glip_jax.data import pipeline

_END = object()


class DevicePrefetch(grain.DatasetIterator):
  """Iterator of global device batches, `size` ahead of the consumer, resumable exactly."""

  def __init__(
      self,
      host_iterator: grain.DatasetIterator,
      mesh: Mesh | None = None,
      size: int = 2,
      keys: tuple[str, ...] | None = None,
      to_device: Callable[[dict[str, Any]], Any] | None = None,
  ):
    self._thread: threading.Thread | None = None  # First: close() (also from __del__) needs it.
    super().__init__(host_iterator)
    if size < 1:
      raise ValueError(f"DevicePrefetch size={size} is invalid; allowed: an int >= 1")
    if to_device is None:
      if mesh is None:
        raise ValueError("DevicePrefetch needs a mesh (or a to_device function)")
      to_device = lambda batch: pipeline.make_global_batch(batch, mesh)  # noqa: E731
    self._host = host_iterator
    self._to_device = to_device
    self._keys = keys
    self._size = size
    self._state = copy.deepcopy(host_iterator.get_state())  # After the batches handed out.
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()

  @staticmethod
  def _put(out: queue.Queue, stop: threading.Event, item: Any) -> None:
    """Blocks until there is room, but gives up once stopped (so `_halt` never waits forever)."""
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
    try:
      while not stop.is_set():
        local = next(self._host)
        # A copy: the state must stay the one after *this* batch whatever the iterator does next.
        state = copy.deepcopy(self._host.get_state())
        if self._keys is not None:
          local = {k: local[k] for k in self._keys}
        self._put(out, stop, (self._to_device(local), state))
    except StopIteration:
      self._put(out, stop, (_END, None))
    except BaseException as e:  # Re-raised in the consumer's thread, where it is actionable.
      self._put(out, stop, (e, None))

  def start_prefetch(self) -> None:
    """Starts the producer thread (idempotent); `next()` calls it on first use."""
    if self._thread is None:
      self._stop = threading.Event()
      self._queue = queue.Queue(maxsize=self._size)
      self._thread = threading.Thread(
          target=self._produce, args=(self._queue, self._stop), daemon=True, name="DevicePrefetch"
      )
      self._thread.start()

  def _halt(self) -> None:
    """Stops the producer and drops what it prefetched (it is re-produced from the state)."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread, self._queue = None, None

  def __next__(self) -> Any:
    self.start_prefetch()
    batch, state = self._queue.get()
    if batch is _END:
      self._halt()
      raise StopIteration
    if isinstance(batch, BaseException):
      self._halt()
      raise batch
    self._state = state
    return batch

  def get_state(self) -> dict[str, Any]:
    """The host iterator's state after the batches consumed (prefetched ones do not count)."""
    return self._state

  def set_state(self, state: dict[str, Any]) -> None:
    """Drops prefetched batches and moves the host iterator to `state`."""
    self._halt()
    self._host.set_state(state)
    self._state = state

  def close(self) -> None:
    """Stops the producer thread and closes the host iterator (worker processes)."""
    self._halt()
    host = getattr(self, "_host", None)
    if hasattr(host, "close"):
      host.close()

  def __repr__(self) -> str:
    return f"DevicePrefetch(size={self._size}, devices={len(jax.devices())})"
