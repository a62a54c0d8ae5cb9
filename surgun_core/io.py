"""File writes: atomic (temp file in the target folder, then rename), and checked before any work.

- atomic_path: nothing is half-written; the final file gets the mode a new file gets (0666 & ~umask), since
  some writers (safetensors) create 0600 files that a web UI running as another user cannot read; it says
  whether it replaced an existing file (two runs writing one path: the second learns it replaced the first).
- check_writable: try the output's folder with a probe file before an erase spends minutes, so a bad path
  (read-only, a folder, under a file, a full disk) is refused at once, naming the setting.
- WriteError: a write that failed after the work (disk full, mount gone read-only), as one clear line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, SurgUnError

log = logging.getLogger(__name__)

PROBE_PREFIX = ".surgun-probe-"  # hidden probe files check_writable creates and removes


class WriteError(SurgUnError, OSError):
    """An output could not be written after the work was done (an OSError too, for callers that catch those)."""


@dataclass(frozen=True)
class Written:
    path: Path
    replaced: bool  # an existing file at `path` was replaced (atomically: readers saw the old or the new one)


class atomic_path:
    """`with atomic_path(p) as tmp:` write `tmp`; on success it becomes `p`, on error it is removed.

    Folders created for `p` are removed again on error, so a failed write leaves nothing behind; clean-up
    errors are logged, never raised over the error that caused them (on a read-only mount, unlink fails too).
    After the block, `.replaced` says whether `p` already existed when the new file took its place.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        # pid and a random part: two processes or two threads writing one path never share a temp file
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}-{secrets.token_hex(3)}")
        self.replaced = False
        self._made: list[Path] = []

    def __enter__(self) -> Path:
        self._made = _make_folders(self.path.parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                os.chmod(self.tmp, new_file_mode())
                self.replaced = _publish(self.tmp, self.path)
            except BaseException:
                self._clean_up()
                raise
        else:
            self._clean_up()
        return False

    def _clean_up(self) -> None:
        try:
            if os.path.lexists(self.tmp):
                os.unlink(self.tmp)
        except OSError as e:
            log.warning("could not remove the temporary file %s (%s)", self.tmp, e.strerror or e)
        for folder in reversed(self._made):
            try:
                folder.rmdir()
            except OSError:  # no longer empty (another writer) or not removable: leave it
                break


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p `folder`; the folders it created, outermost first."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _publish(tmp: Path, path: Path) -> bool:
    """Move `tmp` to `path`; True when a file was there already. A hard link creates `path` only if it is
    absent, which answers "did I replace one?" atomically even with two writers; else a plain rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        os.replace(tmp, path)
        return True
    except OSError:  # no hard links on this file system (FAT, some network mounts)
        existed = os.path.lexists(path)
        os.replace(tmp, path)
        return existed
    try:
        os.unlink(tmp)
    except OSError as e:  # the file is written; only its temporary name is left
        log.warning("could not remove the temporary file %s (%s)", tmp, e.strerror or e)
    return False


def new_file_mode() -> int:
    """0666 & ~umask: the mode open() gives a new file, so outputs are as readable as the user's other files."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for an instant, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike, field: str = "out", folder: bool = False) -> Path:
    """Refuse an output path that cannot be written, before any work: create and remove a hidden probe file
    in the folder the output will go to (or its nearest existing parent, where the folders would be made).

    Args:
        path: the file to write, or with folder=True the folder to write files into (created if missing).
        field: the setting that named the path, for the error (ConfigError(field, ...)).
    Returns:
        `path` as a Path. Nothing is created.
    """
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise ConfigError(field, f"{path} is a file, not a folder; give a folder to write into (made if missing)")
        target = path
    else:
        if path.is_dir():
            raise ConfigError(field, f"{path} is an existing folder; give the path of a file to write inside it")
        if path.exists() and not path.is_file():
            raise ConfigError(field, f"{path} exists and is not a regular file (a device or socket); give a file path")
        target = path.parent
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(field, f"{path}: {existing} is a file, not a folder; give a path inside a folder")
    probe = existing / f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0")  # a new file needs a block: a full disk fails here, not only at the end
        finally:
            os.close(fd)
    except OSError as e:
        _remove_quietly(probe)
        raise ConfigError(field, f"cannot write in {existing} ({_reason(e)}); {_advice(e)}") from e
    _remove_quietly(probe)
    return path


def _remove_quietly(p: Path) -> None:
    try:
        if os.path.lexists(p):
            os.unlink(p)
    except OSError as e:
        log.warning("could not remove the probe file %s (%s)", p, e.strerror or e)


def _errno(e: BaseException) -> int | None:
    """The errno of an OSError, or of a writer's error that only says it in its text ("os error 28")."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    m = re.search(r"os error (\d+)", str(e))
    return int(m.group(1)) if m else None


def _reason(e: BaseException) -> str:
    code = _errno(e)
    return os.strerror(code) if code else str(e).splitlines()[0] if str(e) else type(e).__name__


def _advice(e: BaseException) -> str:
    code = _errno(e)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free some space there or give a path on another disk"
    if code == errno.EROFS:
        return "that file system is mounted read-only: give a path on a writable one"
    if code in (errno.EACCES, errno.EPERM):
        return "you may not write there: give a folder you own, or change its permissions"
    return "give another path"


def write_failure(path: str | os.PathLike, field: str, e: BaseException) -> WriteError:
    """The error to raise when writing `path` failed after the work: one line, the reason and what to do."""
    err = WriteError(f"{field}: could not write {path} ({_reason(e)}), so nothing was written; {_advice(e)}, "
                     "then run again")  # fmt: skip
    err.errno = _errno(e)
    return err


def write_json(path: str | os.PathLike, data) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)
