"""Atomic output: the only way anything lands in a user's directory.

A lock next to the output, a marked temporary sibling (``.NAME.opcm-tmp-PID-TOKEN``) that
the writers fill, fsync of every file and folder, then an atomic swap:
``renameat2(RENAME_EXCHANGE)``, else rename-aside (``.NAME.opcm-old-TOKEN``) with recovery
on the next run. This module makes those names; ``needs_recovery`` (defined torch-free in
``opcm_ext._lightio``, so the CLI's early checks can use it) tells a caller whether a killed run
left something behind, ``recover_output`` cleans it up.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import operator
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from .. import _faults
from .._lightio import MARKER, needs_recovery
from ..errors import OutputError
from ._fs import O_CLOEXEC, disk_full, fsync_path, plain_name
from .reader import CheckpointReader
from .writer import LayoutSpec, SafetensorsWriter

__all__ = ["OutputTransaction", "recover_output", "needs_recovery"]

_log = logging.getLogger(__name__)

_SCRATCH = ".opcm-scratch"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


class _NoExchange(Exception):
    """renameat2(RENAME_EXCHANGE) is not available here."""


def _rename_exchange(a: Path, b: Path) -> None:
    """Atomically exchange two paths; _NoExchange where the kernel/filesystem cannot."""
    if _renameat2 is None:
        raise _NoExchange("libc has no renameat2")
    r = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if r != 0:
        e = ctypes.get_errno()
        if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise _NoExchange(os.strerror(e))
        raise OSError(e, os.strerror(e), str(a), None, str(b))


def _is_weight_file(name: str) -> bool:
    if name.endswith(_WEIGHT_SUFFIXES):
        return True
    return name.endswith(".index.json") and name[: -len(".index.json")].endswith(_WEIGHT_SUFFIXES)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _rmtree(path: Path) -> None:
    shutil.rmtree(path)


def _marker_token(folder: Path) -> str | None:
    try:
        with open(folder / MARKER, encoding="utf-8") as f:
            text = f.read(4096)
    except OSError:
        return None
    m = re.search(r"token=([0-9a-f]+)", text)
    return m.group(1) if m else ""


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.opcm.lock"


def _acquire_lock(out: Path) -> int:
    lock = _lock_path(out)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(f"cannot create the lock file {lock}: {e.strerror}; check the folder's permissions") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        try:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        except OSError:
            pid = "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutputError(
                f"another merge into {out} is running (pid {pid}); wait for it to finish or stop it, "
                "or choose another output path"
            ) from None
        raise OutputError(f"cannot lock {lock}: {e.strerror}; put the output on a local filesystem") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the pid is only for the message
    return fd


def _recover(out: Path) -> list[str]:
    """Clean up after killed runs into ``out`` (caller holds the lock); returns what was done."""
    parent, name = out.parent, out.name
    tmp_re = re.compile(r"\." + re.escape(name) + r"\.opcm-tmp-\d+-([0-9a-f]+)")
    old_re = re.compile(r"\." + re.escape(name) + r"\.opcm-old-([0-9a-f]+)")
    done: list[str] = []
    entries = sorted(os.listdir(parent))
    out_is_dir = out.is_dir() and not out.is_symlink()
    out_token = _marker_token(out) if out_is_dir else None

    def is_real_dir(p: Path) -> bool:
        return p.is_dir() and not p.is_symlink()

    # 1. rename-aside leftovers: restore the previous output or drop it once the new one is in place
    for e in entries:
        m = old_re.fullmatch(e)
        if not m or not is_real_dir(parent / e):
            continue
        if not os.path.lexists(out):
            os.rename(parent / e, out)
            fsync_path(parent, directory=True)
            done.append(f"restored the previous output {out} from {e}")
            out_is_dir, out_token = True, None
        elif out_token is not None and out_token == m.group(1):
            _rmtree(parent / e)
            done.append(f"removed the replaced output {e}")
        else:
            _log.warning("leaving %s alone: %s exists and was not written by the run that left it", parent / e, out)
    # 2. the output holds our marker: a run was killed after its swap; drop what it swapped out
    if out_token is not None:
        for e in entries:
            m = tmp_re.fullmatch(e)
            if m and m.group(1) == out_token and is_real_dir(parent / e):
                _rmtree(parent / e)
                done.append(f"removed the replaced output {e}")
        os.unlink(out / MARKER)
        fsync_path(out, directory=True)
        done.append(f"completed the interrupted commit of {out}")
    # 3. marked temporaries of killed runs (and empty ones created just before the marker)
    for e in entries:
        p = parent / e
        if not tmp_re.fullmatch(e) or not os.path.lexists(p) or not is_real_dir(p):
            continue
        if (p / MARKER).is_file():
            _rmtree(p)
            done.append(f"removed the stale temporary {e}")
        elif not os.listdir(p):
            os.rmdir(p)
            done.append(f"removed the empty temporary {e}")
        else:
            _log.warning("leaving %s alone: it lacks the opcm-ext marker", p)
    for d in done:
        _log.info("%s", d)
    return done


def _abs_out(out_path: str | os.PathLike[str]) -> Path:
    p = Path(os.path.abspath(os.fspath(out_path)))
    if p.name in ("", ".", ".."):
        raise OutputError(f"{out_path!r} is not a usable output path; name a folder or file")
    parent = p.parent
    try:
        parent = parent.resolve(strict=True)
    except (OSError, RuntimeError):
        raise OutputError(
            f"the output's parent folder {parent} does not exist; create it first or choose another path"
        ) from None
    return parent / p.name


def recover_output(out_path: str | os.PathLike[str]) -> list[str]:
    """Under the output lock, clean up after killed runs into ``out_path``; returns what was done."""
    out = _abs_out(out_path)
    fd = _acquire_lock(out)
    try:
        return _recover(out)
    finally:
        os.close(fd)


class OutputTransaction:
    """Lock, temporary sibling, fsync and atomic swap: the only way output reaches the user.

    Use as ``with OutputTransaction(out) as tx: w = tx.writer(layout, md); ...; tx.commit()``.
    Leaving the block without ``commit()`` (or by an exception) discards everything.
    """

    def __init__(
        self,
        out_path: str | os.PathLike[str],
        *,
        kind: str = "folder",
        like_folder: str | os.PathLike[str] | CheckpointReader | None = None,
        expected_bytes: int = 0,
    ) -> None:
        if kind not in ("folder", "file"):
            raise ValueError(f"kind must be 'folder' or 'file', got {kind!r}")
        if like_folder is not None and kind != "folder":
            raise ValueError("like_folder is only meaningful for a folder output")
        try:
            expected_bytes = operator.index(expected_bytes)
        except TypeError:
            raise ValueError(f"expected_bytes must be an int, got {expected_bytes!r}") from None
        if expected_bytes < 0:
            raise ValueError(f"expected_bytes must be >= 0, got {expected_bytes}")
        self.kind = kind
        self.out_path = Path(os.path.abspath(os.fspath(out_path)))
        self.like_folder = like_folder
        self.expected_bytes = expected_bytes
        self._state = "new"
        self._lock_fd: int | None = None
        self._tmp: Path | None = None
        self._token = ""
        self._writers: list[SafetensorsWriter] = []
        self.recovered: list[str] = []

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> OutputTransaction:
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if self._state == "committed":
            return False
        self.abort()
        if isinstance(exc, OSError) and disk_full(exc):
            raise OutputError(
                f"disk full while writing {exc.filename or self.out_path}: {exc.strerror}; "
                f"nothing was changed ({self.out_path} is as before). Free some disk space and retry."
            ) from exc
        return False

    def open(self) -> None:
        """Lock, recover, check, and create the temporary (``with`` calls this)."""
        if self._state != "new":
            raise RuntimeError("an OutputTransaction can be opened once")
        out = self.out_path = _abs_out(self.out_path)
        parent = out.parent
        if not parent.is_dir():
            raise OutputError(f"the output's parent {parent} is not a folder; choose another output path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"the output's parent folder {parent} is not writable; check its permissions")
        self._lock_fd = _acquire_lock(out)
        self._state = "open"
        try:
            try:
                self.recovered = _recover(out)
            except OSError as e:
                raise OutputError(
                    f"cannot clean up after an earlier interrupted run into {out}: {e}; "
                    "check the folder's permissions"
                ) from e
            self._check_target()
            self._check_space()
            self._make_tmp()
            if self.like_folder is not None:
                self.copy_aux(self.like_folder)
        except BaseException:
            self.abort()
            raise

    def _check_target(self) -> None:
        out = self.out_path
        if os.path.islink(out):
            raise OutputError(f"{out} is a symbolic link; pass the real path of the output")
        if not os.path.lexists(out):
            return
        if self.kind == "folder":
            if not out.is_dir():
                raise OutputError(
                    f"{out} exists and is a file, but the output is a model folder; "
                    "remove it or choose another path"
                )
            entries = [e for e in os.listdir(out) if e != MARKER]
            if entries and not any(e.endswith(".safetensors") for e in entries):
                raise OutputError(
                    f"{out} is a non-empty folder that does not hold a safetensors checkpoint; "
                    "refusing to replace it: choose a new or empty output folder"
                )
        else:
            if out.is_dir():
                raise OutputError(
                    f"{out} exists and is a folder, but the output is a single .safetensors file; "
                    "choose another path"
                )
            if not out.name.endswith(".safetensors"):
                raise OutputError(
                    f"{out} exists and is not a .safetensors file; refusing to replace it: "
                    "choose another path"
                )

    def _check_space(self) -> None:
        parent = self.out_path.parent
        try:
            free = shutil.disk_usage(parent).free
        except OSError as e:
            raise OutputError(f"cannot query the free space of {parent}: {e.strerror}") from None
        need = self.expected_bytes + self.expected_bytes // 100 + 16 * 1024 * 1024
        if free < need:
            raise OutputError(
                f"not enough free disk space for {self.out_path}: need {_fmt_bytes(need)} "
                f"({self.expected_bytes} bytes of output + 1% + 16 MiB), {_fmt_bytes(free)} "
                f"({free} bytes) free on the filesystem of {parent}; free some space or choose "
                "another output location"
            )

    def _make_tmp(self) -> None:
        out = self.out_path
        self._token = secrets.token_hex(6)
        tmp = out.parent / f".{out.name}.opcm-tmp-{os.getpid()}-{self._token}"
        try:
            os.mkdir(tmp)
            self._tmp = tmp
            with open(tmp / MARKER, "w", encoding="utf-8") as f:
                f.write(
                    "opcm-ext temporary output of an unfinished merge; safe to delete.\n"
                    f"pid={os.getpid()}\ntoken={self._token}\n"
                )
            os.mkdir(tmp / _SCRATCH)
        except OSError as e:
            raise self._os_error(e, str(tmp)) from e

    def _os_error(self, e: OSError, where: str) -> OutputError:
        if disk_full(e):
            return OutputError(
                f"disk full while writing {where}: {e.strerror}; nothing was changed "
                f"({self.out_path} is as before). Free some disk space and retry."
            )
        return OutputError(f"cannot write {where}: {e.strerror or e}; nothing was changed")

    def _require_open(self) -> Path:
        if self._state != "open" or self._tmp is None:
            raise RuntimeError(f"the output transaction for {self.out_path} is not open ({self._state})")
        return self._tmp

    # -- what callers use ------------------------------------------------------------
    @property
    def out(self) -> Path:
        """The output path (absolute, parent resolved)."""
        return self.out_path

    @property
    def tmp(self) -> Path:
        """The temporary folder (for kind='file' it holds the file as ``tmp / out.name``)."""
        return self._require_open()

    @property
    def scratch_dir(self) -> Path:
        """A folder inside the temporary for method scratch files; deleted before the swap."""
        return self._require_open() / _SCRATCH

    def scratch_path(self, name: str) -> Path:
        """A path for a scratch file called ``name`` inside ``scratch_dir``."""
        return self.scratch_dir / plain_name(name, "scratch file name")

    def writer(self, layout: LayoutSpec, metadata: dict[str, str] | None = None) -> SafetensorsWriter:
        """A SafetensorsWriter into the temporary (kind='file': one shard, named like the output)."""
        tmp = self._require_open()
        if self.kind == "file":
            if len(layout) != 1:
                raise ValueError(f"a single-file output takes a one-shard layout, got {len(layout)} shards")
            layout = [(self.out_path.name, layout[0][1])]
        w = SafetensorsWriter(
            tmp,
            layout,
            metadata,
            index=None if self.kind == "folder" else False,
            _disk_full_note=(
                f"; nothing was changed ({self.out_path} is as before, the temporary output is "
                "removed). Free some disk space and retry."
            ),
        )
        self._writers.append(w)
        return w

    def copy_aux(self, like_folder: str | os.PathLike[str] | CheckpointReader) -> list[str]:
        """Copy the non-weight top-level files (config, tokenizer, README, ...) of a model folder."""
        tmp = self._require_open()
        if self.kind != "folder":
            raise ValueError("copy_aux is only meaningful for a folder output")
        if isinstance(like_folder, CheckpointReader):
            src = like_folder.folder
            if src is None and like_folder.config_path is not None:
                src = like_folder.config_path.parent
            if src is None:
                return []
        else:
            src = Path(like_folder)
        try:
            names = sorted(os.listdir(src))
        except OSError as e:
            raise OutputError(f"cannot list {src} to copy its config and tokenizer files: {e.strerror}") from None
        copied = []
        for n in names:
            if n.startswith(".") or _is_weight_file(n):
                continue
            s = src / n
            if not s.is_file() or os.path.lexists(tmp / n):
                continue
            try:
                shutil.copyfile(s, tmp / n)
            except OSError as e:
                raise self._os_error(e, str(tmp / n)) from e
            copied.append(n)
        return copied

    def commit(self) -> None:
        """Finish the writers, fsync, and swap the temporary into place atomically."""
        tmp = self._require_open()
        out = self.out_path
        try:
            for w in self._writers:
                w.close()
            shutil.rmtree(tmp / _SCRATCH, ignore_errors=True)
            self._check_target()
            if self.kind == "folder":
                if not any(n.endswith(".safetensors") for n in os.listdir(tmp)):
                    raise RuntimeError("commit() without any safetensors written into the output")
            elif not (tmp / out.name).is_file():
                raise RuntimeError("commit() before the output file was written")
            for root, _dirs, files in os.walk(tmp):
                for f in files:
                    fsync_path(Path(root) / f)
            _faults.point("commit.files_synced")
            for root, dirs, _files in os.walk(tmp, topdown=False):
                for d in dirs:
                    fsync_path(Path(root) / d, directory=True)
            fsync_path(tmp, directory=True)
            _faults.point("commit.dir_synced")
        except OSError as e:
            self.abort()
            raise self._os_error(e, getattr(e, "filename", None) or str(tmp)) from e
        except BaseException:
            self.abort()
            raise
        if self.kind == "file":
            self._swap_file(tmp, out)
        else:
            self._swap_folder(tmp, out)
        self._state = "committed"
        self._release_lock()

    def _swap_file(self, tmp: Path, out: Path) -> None:
        _faults.point("commit.before_swap")
        try:
            os.replace(tmp / out.name, out)
        except OSError as e:
            self.abort()
            raise self._os_error(e, str(out)) from e
        self._after_swap_cleanup(out.parent, tmp, marker_in=None)

    def _swap_folder(self, tmp: Path, out: Path) -> None:
        parent = out.parent
        _faults.point("commit.before_swap")
        old: Path | None = None
        try:
            if os.path.lexists(out):
                try:
                    _rename_exchange(tmp, out)
                    old = tmp  # the tmp path now holds the previous output
                except _NoExchange:
                    aside = parent / f".{out.name}.opcm-old-{self._token}"
                    os.rename(out, aside)
                    _faults.point("commit.renamed_aside")
                    try:
                        os.rename(tmp, out)
                    except BaseException:
                        os.rename(aside, out)
                        raise
                    old = aside
            else:
                os.rename(tmp, out)
        except OSError as e:
            self.abort()
            raise self._os_error(e, str(out)) from e
        self._after_swap_cleanup(parent, old, marker_in=out)

    def _after_swap_cleanup(self, parent: Path, old: Path | None, marker_in: Path | None) -> None:
        # the swap is done: from here on nothing may undo it; problems are only warnings
        try:
            fsync_path(parent, directory=True)
        except OSError as e:  # pragma: no cover - fsync of a directory rarely fails
            _log.warning("fsync of %s failed after the swap: %s", parent, e)
        _faults.point("commit.after_swap")
        if old is not None:
            try:
                _rmtree(old)
            except OSError as e:
                _log.warning("could not remove %s after the swap: %s; the next run removes it", old, e)
        self._tmp = None
        _faults.point("commit.old_deleted")
        if marker_in is not None:
            try:
                os.unlink(marker_in / MARKER)
                fsync_path(marker_in, directory=True)
            except OSError as e:
                _log.warning("could not remove %s: %s; the next run removes it", marker_in / MARKER, e)

    def abort(self) -> None:
        """Discard the temporary and release the lock; the output is untouched. Idempotent."""
        if self._state in ("aborted", "committed"):
            return
        for w in self._writers:
            try:
                w.abort()
            except Exception:  # pragma: no cover - best effort
                pass
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._state = "aborted"
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __repr__(self) -> str:
        return f"OutputTransaction({str(self.out_path)!r}, kind={self.kind!r}, state={self._state!r})"
