"""One run per workdir: a lock file holding the owner's pid and host.

Two runs on one workdir would interleave metrics.jsonl, race on the checkpoints and
overwrite each other's eval.json, so `train.run` holds `WORKDIR/run.lock` while it
works. The file is created with O_EXCL (atomic on local and network filesystems) and
holds JSON {"pid", "host", "started"}; it is removed when the run ends, whatever the
outcome. A run killed hard (SIGKILL, power loss) leaves it behind: a later run on
the same host sees that the pid is dead and takes the lock over with a log line. A
lock of another host cannot be checked from here, so the message names it and the
file to delete once that run is known to be gone. On several processes only process
0 takes the lock (the others run the same program in lockstep with it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from fgrpo_jax.errors import UserError

LOCK_FILE = "run.lock"


class WorkdirBusy(UserError):
  """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _read(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}  # half-written by a writer killed between create and write


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir; one line if the path is a file or cannot be made."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir}: exists and is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:  # a parent is a file, no permission, read-only filesystem
    raise UserError(f"--workdir={workdir}: cannot create it ({e.strerror})") from None


def acquire(workdir: str, log=print) -> str:
  """Takes the workdir's lock (creating the workdir); returns the lock file's path."""
  prepare_workdir(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  me = {"pid": os.getpid(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  for _ in range(3):  # a stale lock removed between our tries is retried, not an error
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read(path)
      if holder is None:  # released in the meantime
        continue
      if not _stale(holder, me):
        where = (f"pid {holder.get('pid')} on host {holder.get('host')}"
                 if holder else "an unknown process")
        raise WorkdirBusy(
            f"--workdir={workdir} is in use by another run ({where}, since "
            f"{holder.get('started', '?')}); wait for it, use another --workdir, or delete "
            f"{path} if that run is gone")
      log(f"[lock] taking over {path}: its holder (pid {holder.get('pid')} on "
          f"{holder.get('host')}) is no longer running")
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      continue
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(me, f)
    return path
  raise WorkdirBusy(f"--workdir={workdir}: could not take {path} (another run keeps "
                    "taking it)")


def _stale(holder: dict, me: dict) -> bool:
  """A lock is stale when its pid is dead on this host (or the file is unreadable,
  which only a writer killed mid-write leaves)."""
  if not holder:
    return True
  if holder.get("host") != me["host"]:
    return False  # cannot tell: another machine's process
  pid = holder.get("pid")
  return not isinstance(pid, int) or (pid != me["pid"] and not _pid_alive(pid))


def release(path: str) -> None:
  """Removes the lock if it is still ours (a taken-over lock is left to its owner)."""
  holder = _read(path)
  if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


@contextlib.contextmanager
def hold(workdir: str, log=print, enabled: bool = True):
  """`with hold(workdir):` the run's lifetime (enabled=False: no lock, e.g. process > 0)."""
  if not enabled:
    prepare_workdir(workdir)
    yield None
    return
  path = acquire(workdir, log)
  try:
    yield path
  finally:
    release(path)
