"""SIGTERM (a preemption, a job's time limit, a `kill`) sets a flag; the loop checks it at each step
boundary, saves that step and exits 0. Grain's worker processes get the signal too (it goes to the
whole process group); the loop does not need them for the final save. With several processes the
check is a sync point: a stop any process was asked for is agreed by all at the same step, so all
save the same step (Orbax saves are collective)."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger('coma_jax.train')


class Preemption:
  def __init__(self):
    self._flag = threading.Event()
    self._previous = None

  def install(self) -> 'Preemption':
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    if not self._flag.is_set():
      log.warning('SIGTERM: saving at the next step boundary, then exiting')
    self._flag.set()

  @property
  def requested(self) -> bool:
    return self._flag.is_set()

  def agreed(self) -> bool:
    """Whether any process was asked to stop; every process must call this at the same step."""
    import jax
    if jax.process_count() == 1:
      return self.requested
    import numpy as np
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([int(self.requested)], np.int32))
    return bool(np.asarray(flags).any())

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
