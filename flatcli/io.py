"""Files: atomic writes (a crash, a kill or a power cut never leaves a truncated file under the final name),
run-folder locks, and reading only regular files.

An atomic write goes to a temporary file beside the target, is flushed and ``fsync``-ed, renamed over the
target in one step, and the folder is ``fsync``-ed after the rename. The final file gets the permissions a
plain ``open()`` would give it under the user's umask (the temporary is private while it is written).
"""
import contextlib
import errno
import os
import re
import stat
import tempfile
from pathlib import Path

from flatcli.errors import FlatcliError

# atomic_path's .NAME.XXXXXX.tmp.SUFFIX, and .tmpXXXXXX: the temporary safetensors' own writer makes beside it
TEMP_PATTERN = re.compile(r"^(\..+\.[A-Za-z0-9_]{6,}\.tmp(\.[A-Za-z0-9]+)?|\.tmp[A-Za-z0-9]{6})$")
LOCK_NAME = ".lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, on failure it vanishes.

    The temporary, ``.NAME.XXXXXX.tmp.SUFFIX``, ends in the final suffix, so a writer that picks its format by
    the suffix (matplotlib's savefig) writes the right one.
    """
    path = Path(path)
    check_writable_dir(path.parent, what=str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            raise FlatcliError(f"cannot write {str(path)!r}: {e.strerror}; {kept}",
                               "free some space (or pick another place) and run it again") from None
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def check_writable_dir(folder: str | os.PathLike, what: str | None = None) -> None:
    """A folder that exists and can be written to, or a FlatcliError that says which and why."""
    folder = Path(folder) if str(folder) else Path(".")
    what = what or str(folder)
    if not folder.is_dir():
        raise FlatcliError(f"cannot write {what}: folder {str(folder)!r} does not exist", "create it first or pick another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FlatcliError(f"cannot write {what}: folder {str(folder)!r} is not writable", "pick a writable path")


def make_run_dir(path: str | os.PathLike) -> Path:
    """Create a run folder (and its parents); a FlatcliError when that is impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlatcliError(f"cannot create the output folder {str(path)!r} ({e.strerror})", "pick a writable --out") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FlatcliError(f"the output folder {str(path)!r} is not writable", "pick a writable --out")
    return path


class RunLock:
    """An exclusive lock on a run folder for as long as this process holds the object (or lives).

    ``flock`` on ``FOLDER/.lock``: the kernel releases it when the process ends, however it ends, so a killed
    run never leaves a stale lock. The file holds the owner's process id, to name it in the refusal.
    """

    def __init__(self, folder: Path):
        import fcntl
        self.path = Path(folder) / LOCK_NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None  # closed: __del__ must not close a descriptor number that may be reused
            raise FlatcliError(f"run folder {str(folder)!r} is in use by another flatcli train (process {owner})",
                               "wait for it to finish, or pick another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __del__(self):
        self.release()


def remove_stray_temporaries(folder: Path) -> list[str]:
    """Delete the temporary files an atomic write left behind when it was killed (call with the lock held)."""
    removed = []
    for p in Path(folder).iterdir():
        if TEMP_PATTERN.match(p.name) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p.name)
    return removed


def check_regular_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` is an existing regular file (not a FIFO, a device, a socket): reading it cannot hang or flood.

    Links are followed (a link to a regular file is fine).
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FlatcliError(f"{what} {str(path)!r} does not exist", "check the path") from None
    except OSError as e:
        raise FlatcliError(f"cannot read {what} {str(path)!r} ({e.strerror})", "check the path and its permissions") \
            from None
    if stat.S_ISDIR(mode):
        return path
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise FlatcliError(f"{what} {str(path)!r} is {kind}, not a regular file", "pass a file saved on disk")
    return path


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable of /proc/meminfo, capped by what RLIMIT_AS leaves."""
    total = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    total = int(line.split()[1]) * 1024
    if total is None:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            total = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    total = total or 2 ** 40
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:  # the address space left under the limit
            total = min(total, soft - _address_space_in_use())
    return total


def _address_space_in_use() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    return 0


def check_allocation(nbytes: int, what: str, fix: str) -> None:
    """Refuse, before allocating, a size (declared by a file or an option) that cannot fit in memory."""
    free = available_memory()
    if nbytes > free:
        raise FlatcliError(f"{what} needs {nbytes / 2 ** 30:.3g} GiB, more than the {max(free, 0) / 2 ** 30:.3g} "
                           "GiB of memory available", fix)
