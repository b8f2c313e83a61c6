"""Safe output folder: written in a temporary folder next to the target, under a lock, swapped in whole.

Contract: `check_target(path, force, source)` raises UsageError (exit 2), before anything is loaded, when
`path` is a file; is, contains or lies inside the input model `source` (`--force` or not); or is a non-empty
folder and `force` is not set, or is set but the folder is not a previous qtool output (no `qtool.json`):
`--force` replaces only a qtool output or an empty folder. Missing parent folders are fine (created by
`staged`). `staged(path, force, source)` is a context manager yielding the temporary folder
`.NAME.qtool-tmp-PID-*`. For its whole duration it holds an fcntl lock on `.NAME.qtool-lock` next to the
target (a second writer of the same path fails at once, exit 1, naming the holder's pid); on entry it removes
the `.NAME.qtool-tmp-PID-*` / `.NAME.qtool-old-PID-*` folders of dead processes and re-checks the target. On
normal exit the permissions follow the umask (0777 & ~umask for folders, 0666 & ~umask for files, as `cp`
does), the target is re-checked (a target that appeared meanwhile is refused without `--force`) and the new
folder replaces the old one as a whole: one atomic exchange (renameat2 RENAME_EXCHANGE) where the file system
has it, else old renamed aside, new renamed in, old deleted. On any exception, Ctrl-C included, the temporary
folder is removed and the target is left as it was.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from qtool.errors import Failure, UsageError

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _relation(out: Path, source: Path) -> str | None:
    """How `out` overlaps the input model path `source`, or None."""
    o, s = out.resolve(), source.resolve()
    if o == s or (o.exists() and s.exists() and os.path.samefile(o, s)):
        return "is the input model"
    if s in o.parents:
        return "lies inside the input model folder"
    if o in s.parents:
        return "contains the input model"
    return None


def is_qtool_output(path: Path) -> bool:
    return (Path(path) / "qtool.json").is_file()


def check_target(path: Path, force: bool, source: Path | str | None = None) -> None:
    path = Path(path)
    if source is not None and str(source) and Path(source).expanduser().exists():
        how = _relation(path, Path(source).expanduser())
        if how:
            raise UsageError(f"--output {path} {how} ({source}); refusing to overwrite the model being quantized",
                             hint="choose a fresh --output folder outside the input model")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise UsageError(f"--output {path} exists and is not empty",
                             hint="choose another folder, or pass --force to replace a previous qtool output")
        if not is_qtool_output(path):
            raise UsageError(f"--output {path} exists and is not a qtool output (no qtool.json); --force only "
                             "replaces a previous qtool output or an empty folder", hint="choose a fresh --output path")
    parent = path.resolve().parent
    while not parent.exists():   # missing parents are created by staged(), under the nearest existing one
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--output {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}")


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)      # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Modes of everything under `root` (root included) as a fresh `cp` would make them under the umask."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o777 & ~mask)
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False when the C library or the file system does not offer it (the caller falls back)."""
    import ctypes
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(str(src)), at_fdcwd, os.fsencode(str(dst)), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextlib.contextmanager
def locked(path: Path):
    """Hold the lock of output `path` (`.NAME.qtool-lock` in its parent); Failure when another process has it."""
    import fcntl
    lock = path.parent / f".{path.name}.qtool-lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise Failure(f"another qtool process (pid {holder}) is writing {path}",
                          hint="wait for it to finish, or choose another --output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:        # not a lock file that its previous holder unlinked after we opened it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: Path) -> list[Path]:
    """Remove the staging folders of `path` left by dead processes (SIGKILL, power loss); returns them."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.qtool-(?:tmp|old)-(\d+)-")
    removed = []
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _swap_in(tmp: Path, path: Path) -> None:
    """Put `tmp` at `path`: fails if `path` appeared meanwhile (absent before); a whole-folder swap otherwise."""
    if not path.exists():
        try:
            if _renameat2(tmp, path, RENAME_NOREPLACE):
                return
            os.rename(tmp, path)      # fallback: still refuses a non-empty folder that appeared (ENOTEMPTY)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise UsageError(f"--output {path} appeared while quantizing; it was not replaced",
                                 hint="choose a fresh --output path") from None
            raise
        return
    if _renameat2(tmp, path, RENAME_EXCHANGE):      # tmp now holds the old folder (deleted by the caller)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.qtool-old-{os.getpid()}-", dir=path.parent))
    os.rename(path, old / "x")
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old / "x", path)
        raise
    os.rename(old / "x", tmp)        # the caller deletes tmp: here, the old folder
    old.rmdir()


@contextlib.contextmanager
def staged(path: Path, force: bool, source: Path | str | None = None):
    path = Path(path).resolve()
    check_target(path, force, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        check_target(path, force, source)          # again, now that no other qtool can write it
        clean_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.qtool-tmp-{os.getpid()}-", dir=path.parent))
        try:
            yield tmp
            apply_umask(tmp)
            try:                                   # a target that appeared meanwhile: refused without --force
                check_target(path, force, source)
            except UsageError as err:
                raise UsageError(f"{err.message} (it changed while quantizing; the new checkpoint was discarded)",
                                 hint=err.hint) from None
            _swap_in(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
