"""One trainer per workdir: an OS file lock on WORKDIR/.mmjax-lock.

`flock` locks belong to the open file, so the kernel releases them when the process
exits in any way (SIGKILL, a crash, a lost node): a killed run never leaves a stale
lock behind, and the file that stays on disk is harmless. The file holds the holder's
pid and host, for the message a second trainer gets. Process 0 takes it before the run
writes anything; eval mode takes none (it writes only under WORKDIR/eval/).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

LOCK_FILE = ".mmjax-lock"


class WorkdirInUseError(RuntimeError):
  pass


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the lock, or raises `WorkdirInUseError` at once
  naming the holder."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise WorkdirInUseError(
          f"workdir {self.workdir} is in use by a trainer still running ({holder}; lock "
          f"file {self.path}); wait for it to finish or stop it, or use another "
          "--workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, (f"pid {os.getpid()} on host {socket.gethostname()}, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
