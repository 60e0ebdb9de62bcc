"""Files, the bottom layer: atomic writes and output folders. Imports nothing from the package.

Every file the project writes goes through ``atomic_write``: the content goes to a temporary file in the
same folder, is fsync'ed, and is renamed over the target, so a reader (or a crash) never sees half a file
and a failed write leaves the previous file as it was. Temporary names start with TEMP_PREFIX; an
output folder prepared with ``prepare_output_folder`` drops the ones an interrupted write left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

TEMP_PREFIX = ".tmp-"


def atomic_write(path: str, write) -> None:
    """write(tmp_path) then rename over ``path``: readers never see a half-written file, and a failed or
    interrupted write leaves the previous ``path`` as it was. Write failures (a full disk, a vanished
    folder) become one OSError naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.basename(path))
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


def prepare_output_folder(path, flag: str = "--out") -> int:
    """Make ``path`` (and its parents) and prove it writable, before any long work; errors name the flag.

    Temporary files that an earlier, killed write left behind (``.tmp-*``, see atomic_write) are removed;
    returns how many.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"{flag} {path}: exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OSError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    return remove_stale_temp_files(path)


def remove_stale_temp_files(folder: str) -> int:
    """Delete the ``.tmp-*`` files an interrupted atomic_write left in ``folder``; returns how many."""
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        full = os.path.join(folder, name)
        if name.startswith(TEMP_PREFIX) and os.path.isfile(full):
            try:
                os.unlink(full)
                removed += 1
            except OSError:
                pass
    return removed
