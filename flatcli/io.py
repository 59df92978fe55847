"""Atomic file writes: a crash or Ctrl-C never leaves a truncated file behind."""
import contextlib
import os
import tempfile
from pathlib import Path

from flatcli.errors import FlatcliError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, on failure it vanishes."""
    path = Path(path)
    check_writable_dir(path.parent, what=str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
