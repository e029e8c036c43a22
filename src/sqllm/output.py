"""Outputs that a failure or an interrupt can neither leave half-written nor lose.

* Checked before the long work: the target's parent can be written, the target is not an input, not the
  working folder nor a parent of it, and an existing target is replaced only with ``overwrite`` and only
  when it is something sqllm wrote.
* Written into a temporary sibling ``.NAME.tmp-PID-XXXX``, then put in place: a new target by one
  rename, an existing folder by an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``), elsewhere by
  moving the old one aside to ``.NAME.old-PID-XXXX`` only once the new one is complete.
* A later run finishes what a killed one left (:func:`recover`): temporaries of dead processes are
  removed, and an old folder moved aside just before the kill is put back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

from .errors import OutputExists, UnsafeOutput

Writer = Callable[[Path], None]


def check_folder_output(
    out_dir: str | os.PathLike, overwrite: bool, *, ours: Callable[[Path], bool], inputs: Iterable[object] = (),
) -> Path:
    """The absolute output folder, refused up front unless it can be written without losing anything.

    ours:   whether an existing folder is one sqllm wrote (only those, or empty ones, are replaced)
    inputs: paths the run reads (model, text files); the output may be none of them nor a parent of one
    """
    out = _target(out_dir, inputs)
    if out.exists():
        if not out.is_dir():
            raise UnsafeOutput(f"output {str(out_dir)!r} is an existing file, not a folder; choose a folder path")
        if not overwrite:
            raise OutputExists(f"output folder {str(out_dir)!r} exists; pass --overwrite to replace it")
        if any(out.iterdir()) and not ours(out):
            raise UnsafeOutput(
                f"--overwrite replaces only folders that sqllm wrote, and {str(out_dir)!r} is not one; "
                f"remove it yourself or choose another output folder"
            )
    _check_writable_parent(out)
    return out


def check_file_output(
    out_path: str | os.PathLike, overwrite: bool, *, ours: Callable[[Path], bool] | None = None,
    inputs: Iterable[object] = (),
) -> Path:
    """The absolute output file, refused up front unless it can be written without losing anything.

    ours: whether an existing file is one sqllm wrote (None: any file may be replaced with ``overwrite``)
    """
    out = _target(out_path, inputs)
    if out.is_dir():
        raise UnsafeOutput(f"output {str(out_path)!r} is a folder; give a file path")
    if out.exists():
        if not overwrite:
            raise OutputExists(f"output file {str(out_path)!r} exists; pass --overwrite to replace it")
        if ours is not None and not ours(out):
            raise UnsafeOutput(
                f"--overwrite replaces only files that sqllm wrote, and {str(out_path)!r} is not one; "
                f"remove it yourself or choose another output file"
            )
    _check_writable_parent(out)
    return out


def write_folder(out: Path, write: Writer) -> None:
    """Run ``write(tmp)`` on a new temporary sibling folder of ``out``, then put it in place of ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()
    try:
        write(tmp)
        _publish(tmp)
        _put_in_place(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def write_file(out: Path, write: Writer) -> None:
    """Run ``write(tmp)`` on a temporary sibling file path of ``out``, then rename it onto ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def recover(out: Path) -> None:
    """Clean up after runs that were killed while writing ``out``: remove their temporaries, and put back
    the old folder one of them had moved aside if ``out`` is missing. Runs still alive are left alone."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]+")
    for entry in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if m is None or _alive(int(m[2])):
            continue
        if m[1] == "old" and not os.path.lexists(out):
            os.rename(entry, out)  # killed between the two renames of a swap: the old folder comes back
        else:
            _remove(entry)


def _target(path: str | os.PathLike, inputs: Iterable[object]) -> Path:
    """``path`` made absolute (symlinks resolved), after finishing killed runs' leftovers there; refused
    when it is the working folder, a parent of it, an input, or a parent of an input."""
    out = Path(os.path.realpath(Path(path).expanduser()))
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        where = "the current folder" if out == cwd else "a parent of the current folder"
        raise UnsafeOutput(f"output {str(path)!r} is {where}; choose a new path for the output")
    for inp in inputs:
        if not isinstance(inp, (str, os.PathLike)) or not os.path.lexists(Path(inp).expanduser()):
            continue  # a hub id, a dataset name, an in-memory object
        src = Path(os.path.realpath(Path(inp).expanduser()))
        if out == src or out in src.parents:
            raise UnsafeOutput(f"output {str(path)!r} would replace the input {str(inp)!r}; choose another output")
    recover(out)
    return out


def _check_writable_parent(out: Path) -> None:
    """Refuse a target whose nearest existing ancestor is a file or cannot be written (probed by making
    and removing an empty folder there, which also catches read-only and virtual file systems)."""
    anc = out.parent
    while not os.path.lexists(anc):
        anc = anc.parent
    if not anc.is_dir():
        raise UnsafeOutput(f"cannot create {out}: {anc} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sqllm-probe-", dir=anc))
    except OSError as exc:
        raise UnsafeOutput(f"cannot write {out}: {anc} is not writable ({exc.strerror})") from None


def _sibling(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _put_in_place(new: Path, out: Path) -> None:
    """Make the complete folder ``new`` appear at ``out``; at no moment is ``out`` missing if it existed
    (except, without an atomic exchange, between two renames that :func:`recover` undoes)."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    if _exchange(new, out):
        _remove(new)  # now the old folder
        return
    old = _sibling(out, "old")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    _remove(old)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc older than glibc 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b``; False where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(folder: Path) -> None:
    """Give the folder and everything in it the modes of freshly created files (writers such as
    safetensors create private 0600 files); the umask still applies."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
