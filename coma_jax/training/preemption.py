"""SIGTERM (a preemption, a job's time limit, a `kill`) sets a flag; the loop checks it at each step
boundary, saves that step and exits 0. Grain's worker processes get the signal too (it goes to the
whole process group); the loop does not need them for the final save."""
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

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
