"""Files, the bottom layer: atomic writes, run folders and the train run layout. Imports nothing from the package.

Every file the project writes goes through ``atomic_write``: the content goes to a temporary file in the
same folder, is fsync'ed, and is renamed over the target, so a reader (or a crash) never sees half a file
and a failed write leaves the previous file as it was.

We touch only what we made. A temporary name says that this project wrote it and who did:
``.ddpm_fast-tmp~HOST~PID~RANDOM~NAME``. A run folder (``RunFolder``) is held with a lock while a process
writes into it: another process is refused that folder (and its subfolders) with one line, and a
temporary file is removed as stale only when its writer is gone. Anything else in the folder (a user's own
``.tmp-notes.txt``) is never touched.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import tempfile

try:
    import fcntl
except ImportError:  # not a POSIX system: folders are not locked
    fcntl = None

TEMP_PREFIX = ".ddpm_fast-tmp~"
LOCK_NAME = ".ddpm_fast.lock"
# The layout of a training run's --out folder (ddpm_fast.trainer writes it, ddpm_fast.loading reads it): the
# resumable state, the exported EMA model (a model folder) and the sample grids.
RUN_CHECKPOINT = "checkpoint.pt"
RUN_MODEL_FOLDER = "model"
RUN_SAMPLES_FOLDER = "samples"


def _writer() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def temp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of the process that made the temporary file ``name``; None if we did not make it."""
    if not name.startswith(TEMP_PREFIX):
        return None
    parts = name[len(TEMP_PREFIX):].split("~", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _alive(host: str, pid: int) -> bool:
    """Whether the process (host, pid) may still be running: True for another host (we cannot tell)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def atomic_write(path: str, write) -> None:
    """write(tmp_path) then rename over ``path``: readers never see a half-written file, and a failed or
    interrupted write leaves the previous ``path`` as it was. Write failures (a full disk, a vanished
    folder) become one OSError naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        host, pid = _writer()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{host}~{pid}~",
                                   suffix="~" + os.path.basename(path))
    except OSError as exc:
        raise OSError(f"{path}: cannot write ({exc.strerror or exc})") from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should read like any new file
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # torch.save reports a full disk as a RuntimeError, safetensors as its own error type.
        if isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError":
            reason = (exc.strerror if isinstance(exc, OSError) else None) or (str(exc).strip().splitlines()
                                                                             or [type(exc).__name__])[-1]
            try:
                if shutil.disk_usage(folder).free < 16 << 20:
                    reason += "; the disk is full"
            except OSError:
                pass
            raise OSError(f"{path}: cannot write ({reason}); the previous file, if any, is unchanged") from None
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class FolderBusy(OSError):
    """Another live process holds the run folder."""


_HELD: dict[str, list] = {}  # realpath -> [fd, holds] of the run folders this process locked


def _lock_holder(lock_path: str) -> str:
    try:
        with open(lock_path) as f:
            info = json.loads(f.read() or "{}")
        return f"pid {info['pid']} on {info['host']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that did not say who it is"


def _try_lock(lock_path: str, create: bool) -> int | None:
    """An fd holding an exclusive lock on lock_path, or None if another process holds it."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    while True:
        try:
            fd = os.open(lock_path, flags, 0o644)
        except FileNotFoundError:
            return -1  # not created: nobody holds it
        except OSError as exc:  # a folder (or anything else) in the lock file's place
            what = "a folder" if os.path.isdir(lock_path) else "not a lock file this project can open"
            raise OSError(f"{lock_path}: the run folder's lock file is {what} ({exc.strerror or exc}); "
                          "remove it if no run holds this folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return fd  # a file system without locks (some network mounts): the folder goes unlocked
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return None
            raise OSError(f"{lock_path}: cannot lock ({exc.strerror or exc})") from None
        try:  # the holder before us may have removed the file between our open and our lock: retry then
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
        if not create:
            return -1


class RunFolder:
    """``with RunFolder(path, "--out") as folder:`` -- the folder a run writes, made (with its parents) and
    proved writable before any long work, and held for the run:

    - a lock (``LOCK_NAME``, flock) says that this process writes here; another process asking for the
      folder, or for a folder inside it, is refused with one line naming the holder (the kernel drops the
      lock when a holder dies, so a killed run never blocks the next);
    - temporary files that a killed write of ours left (see atomic_write) are removed, and only when their
      writer is gone (``removed`` counts them; ``remove_stale(sub)`` does the same in a subfolder);
    - nothing is created before the folders above are known not to be another live run's; a folder this run
      made (the folder itself and the parents it needed) and left empty is removed when the run fails.

    ``active=False`` (the other ranks of a torchrun) does nothing. Errors are OSError naming ``flag``."""

    def __init__(self, path, flag: str = "--out", active: bool = True):
        self.path, self.flag, self.active = os.fspath(path), flag, active
        self.removed, self._made, self._key = 0, [], None

    def __enter__(self) -> RunFolder:
        if not self.active:
            return self
        path, flag = self.path, self.flag
        if os.path.exists(path) and not os.path.isdir(path):
            raise OSError(f"{flag} {path}: exists and is not a folder")
        key = os.path.realpath(path)
        if fcntl is not None and key not in _HELD:
            self._check_ancestors(key)  # before anything is made: a busy ancestor leaves no trace
        missing, d = [], os.path.abspath(path)
        while not os.path.exists(d):
            missing.append(d)
            d = os.path.dirname(d)
        self._made = missing[::-1]  # outermost first
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            self._drop_if_made()
            raise OSError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
        try:
            self._lock()
        except BaseException:
            self._drop_if_made()
            raise
        self.removed = self.remove_stale()
        return self

    def _drop_if_made(self) -> None:
        for d in reversed(self._made):  # innermost first, each only if empty: what a failed run made
            try:
                os.rmdir(d)
            except OSError:
                break

    def _lock(self) -> None:
        if fcntl is None:
            return
        key = os.path.realpath(self.path)
        held = _HELD.get(key)
        if held is not None:  # this process already holds it (a run inside a run): share the hold
            held[1] += 1
            self._key = key
            return
        self._check_ancestors(key)
        lock_path = os.path.join(key, LOCK_NAME)
        fd = _try_lock(lock_path, create=True)
        if fd is None:
            raise FolderBusy(f"{self.flag} {self.path}: another ddpm_fast process is writing there "
                             f"({_lock_holder(lock_path)}); wait for it or pick another folder")
        host, pid = _writer()
        info = json.dumps({"host": host, "pid": pid, "command": " ".join(os.path.basename(a) if i == 0 else a
                                                                        for i, a in enumerate(sys.argv))[:300]})
        os.ftruncate(fd, 0)
        os.write(fd, info.encode())
        _HELD[key] = [fd, 1]
        self._key = key

    def _check_ancestors(self, key: str) -> None:
        """FolderBusy if a folder above ``key`` is another live run's (a folder inside a run is that run's)."""
        parent = os.path.dirname(key)
        while parent and parent not in _HELD:  # a folder inside another live run's folder is that run's
            above = os.path.join(parent, LOCK_NAME)
            if os.path.exists(above):
                fd = _try_lock(above, create=False)
                if fd is None:
                    raise FolderBusy(f"{self.flag} {self.path}: inside {parent}, where another ddpm_fast process "
                                     f"is writing ({_lock_holder(above)}); wait for it or pick another folder")
                if fd >= 0:
                    os.close(fd)
            if os.path.dirname(parent) == parent:
                break
            parent = os.path.dirname(parent)

    def remove_stale(self, sub: str | None = None) -> int:
        """Delete the temporary files of ours in the folder (or its subfolder ``sub``) whose writer is gone."""
        folder = self.path if sub is None else os.path.join(self.path, sub)
        removed = 0
        try:
            names = os.listdir(folder)
        except OSError:
            return 0
        for name in names:
            owner, full = temp_owner(name), os.path.join(folder, name)
            if owner is not None and not _alive(*owner) and os.path.isfile(full):
                try:
                    os.unlink(full)
                    removed += 1
                except OSError:
                    pass
        return removed

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._key is not None:
            held = _HELD[self._key]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[self._key]
                try:
                    os.unlink(os.path.join(self._key, LOCK_NAME))
                except OSError:
                    pass
                os.close(held[0])
            self._key = None
        if exc_type is not None:
            self._drop_if_made()
        return False
