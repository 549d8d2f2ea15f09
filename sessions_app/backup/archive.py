"""The archive file: a tar of ``manifest.json``, data members and ``manifest.sha256``.

Written to a hidden temporary file of its own in the target directory (created exclusively, mode
0600, never through a symbolic link, locked while it is written), every write checked, fsynced,
then linked to a name no other file has, so a crash or a full disk never leaves a partial archive
under a backup's name, and two backups written at once never share a file. Verification reads
every member and compares its size and sha256 with the manifest before anything trusts it.

Members are copied in by the kernel (``copy_file_range``) while a thread hashes them, both
letting go of the GIL; a member can be started before the others exist (``Writer.add``), so the
native copy of a SQLite database goes into the archive beside the export of the portable form.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

FORMAT = "termsys-backup"
VERSION = 4
# Version 1: every member is the portable form or the native copy for operators; 2 added the
# search index member and the native copy restore loads; 3 the binary copies (``copies``); 4
# compresses those, and the search index beside them, with zstd instead of gzip.
READS = (1, 2, 3, 4)
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"
SUFFIX = ".tar"
HASH_BLOCK = 1024 * 1024
COPY_BLOCK = 64 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2


def _libc_sync_file_range() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # not Linux
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_sync_file_range = _libc_sync_file_range()
MANIFEST_SLACK = 64 * 1024  # bytes kept beyond a manifest's bound (see Writer)

TEMPORARY_SUFFIX = ".tmp"  # ``.<archive name>.<random>.tmp``: an archive being written
NAME_ATTEMPTS = 1000  # names tried (``-2``, ``-3``, ...) when others took the archive's name

NOT_AN_ARCHIVE = "{file}: not a termsys backup archive ({why}); nothing changed."
IS_A_DIRECTORY = "it is a directory, not an archive file"
NO_SUCH_FILE = "no such file"
NOT_A_FILE = "not a regular file"
CORRUPT = "{file}: corrupt archive: {why}; nothing changed."
UNSUPPORTED = (
    "{file}: archive format {format!r} version {version!r}; this termsys reads "
    f"{FORMAT!r} versions {', '.join(map(str, READS))}. Nothing changed."
)


class ArchiveError(Exception):
    """The file is not a usable archive; the message says why and what to do."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n"


def manifest_bound(manifest: dict[str, Any], names: list[str]) -> int:
    """Return room enough for ``manifest`` once its counts and member hashes are known.

    Numbers it holds may grow (row counts are bounded by 16 digits here), and texts may change
    (a native copy that failed says why), hence the slack.
    """
    bound = {name: {"size": 10**15, "sha256": "0" * 64} for name in names}
    return len(_manifest_bytes({**manifest, "members": bound})) + MANIFEST_SLACK


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(time.time())
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "strict")


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _sha256(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while size > 0 and (block := fh.read(min(HASH_BLOCK, size))):
            digest.update(block)
            size -= len(block)
    return digest.hexdigest()


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``: ``os.pwrite`` may write less (a full disk writes
    what fits, then fails), and a short write ignored leaves a hole in the archive."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[written:], offset + written


def write_out(fd: int, offset: int, size: int) -> None:
    """Start writing ``size`` bytes of ``fd`` at ``offset`` to disk, without waiting (Linux's
    ``sync_file_range``). The kernel would begin only once a tenth of memory is dirty, so the
    fsync at the end wrote every byte of a large archive or copy while nothing else ran; this
    way the disk writes while the rest is copied and computed. Does nothing where unavailable.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, size, SYNC_FILE_RANGE_WRITE)


def copy_range(source: int, target: int, size: int, at_source: int, at_target: int) -> None:
    """Copy ``size`` bytes between open files in the kernel, with a plain loop as fallback;
    what is copied starts to be written to disk (``write_out``)."""
    done = 0
    try:
        while done < size:
            step = os.copy_file_range(
                source, target, min(COPY_BLOCK, size - done), at_source + done, at_target + done
            )
            if step == 0:
                raise OSError(f"copy_file_range copied nothing at {done} of {size} bytes")
            write_out(target, at_target + done, step)
            done += step
        return
    except OSError as exc:
        if done or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while done < size:  # file systems without copy_file_range between these two files
        block = os.pread(source, min(HASH_BLOCK, size - done), at_source + done)
        if not block:
            raise OSError(f"short read at {done} of {size} bytes")
        pwrite_all(target, block, at_target + done)
        done += len(block)


# Run by ``Writer.add(own_process=True)``: copy (the kernel) and hash (a thread) side by side.
# An OSError ends it with status 3 and ``errno strerror`` on stderr, raised again by the caller.
_COPY_APART = """
import ctypes, hashlib, os, sys, threading
try:
    write_out = ctypes.CDLL(None, use_errno=True).sync_file_range
    write_out.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (AttributeError, OSError):
    write_out = None
source, target, at, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fd = os.open(source, os.O_RDONLY)
digest = hashlib.sha256()
def hash_():
    pos = 0
    while pos < size:
        block = os.pread(fd, min(1 << 20, size - pos), pos)
        if not block:
            raise OSError("short read")
        digest.update(block)
        pos += len(block)
def pwrite_all(data, offset):
    view = memoryview(data)
    while view:
        written = os.pwrite(target, view, offset)
        if written <= 0:
            raise OSError(28, os.strerror(28))
        view, offset = view[written:], offset + written
def copy():
    done = 0
    try:
        while done < size:
            step = os.copy_file_range(fd, target, min(1 << 26, size - done), done, at + done)
            if step == 0:
                raise OSError(0, "copy_file_range copied nothing")
            if write_out is not None:
                write_out(target, at + done, step, 2)  # SYNC_FILE_RANGE_WRITE, as write_out
            done += step
    except OSError as exc:
        # Nothing copied, or EXDEV, ENOSYS, EINVAL, EOPNOTSUPP at the start: the plain loop.
        if done or exc.errno not in (0, 18, 38, 22, 95):
            raise
    while done < size:
        block = os.pread(fd, min(1 << 20, size - done), done)
        if not block:
            raise OSError(0, "short read")
        pwrite_all(block, at + done)
        done += len(block)
thread = threading.Thread(target=hash_)
thread.start()
try:
    copy()
except OSError as exc:
    sys.stderr.write(f"{exc.errno or 0} {exc.strerror or exc}")
    sys.exit(3)
finally:
    thread.join()
print(digest.hexdigest())
"""


class Writer:
    """An archive being written: ``add`` members (copied and hashed in threads), ``finish``.

    ``manifest.json`` comes first but holds every member's sha256, so its place (``reserve``
    bytes, see ``manifest_bound``) is kept and it is written last, padded with spaces to that
    size, which JSON ignores.
    """

    def __init__(self, path: Path, reserve: int) -> None:
        self.path = path
        self.reserve = reserve
        # A file of its own (O_EXCL, O_NOFOLLOW, 0600: a file or link someone put there is
        # never reused nor followed), locked: ``leftovers`` removes it only once its writer
        # is gone.
        self.fd, name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent
        )
        self.temporary = Path(name)
        os.fchmod(self.fd, 0o600)  # whatever the umask
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.offset = len(_header(MANIFEST, reserve)) + _padded(reserve)
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="backup-archive")
        self.members: dict[str, tuple[int, Future[str]]] = {}

    def add(
        self, name: str, source: Path, size: int | None = None, *, own_process: bool = False
    ) -> None:
        """Copy the first ``size`` bytes of ``source`` (all of it by default) in as ``name``.

        It runs in threads; the source must keep those bytes until ``finish`` (or ``wait``).
        ``own_process``: read ``source`` from a process of its own, for a file SQLite has open
        in this one: closing any descriptor of a file drops every POSIX lock this process holds
        on it, SQLite's included (https://sqlite.org/howtocorrupt.html, 2.2).
        """
        size = source.stat().st_size if size is None else size
        header = _header(name, size)
        at = self.offset + len(header)
        pwrite_all(self.fd, header, self.offset)
        self.offset = at + _padded(size)
        os.ftruncate(self.fd, self.offset)  # the padding: zeros
        if own_process:
            self.members[name] = (size, self.pool.submit(self._copy_apart, source, size, at))
            return

        def copy() -> None:
            with source.open("rb") as fh:
                copy_range(fh.fileno(), self.fd, size, 0, at)

        copied = self.pool.submit(copy)
        hashed = self.pool.submit(_sha256, source, size)
        self.members[name] = (size, self._both(copied, hashed))

    def _copy_apart(self, source: Path, size: int, at: int) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _COPY_APART, str(source), str(self.fd), str(at), str(size)],
            pass_fds=(self.fd,),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            number, _, why = done.stderr.strip().partition(" ")
            if done.returncode == 3 and number.isdigit() and int(number):
                raise OSError(int(number), why)
            raise OSError(f"copying {source} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def _both(self, copied: Future[None], hashed: Future[str]) -> Future[str]:
        done: Future[str] = Future()

        def check(_: Future[Any]) -> None:
            if copied.done() and hashed.done() and not done.done():
                error = copied.exception() or hashed.exception()
                if error is not None:
                    done.set_exception(error)
                else:
                    done.set_result(hashed.result())

        copied.add_done_callback(check)
        hashed.add_done_callback(check)
        return done

    def wait(self, name: str) -> None:
        """Return once member ``name`` is in (its source may change from then on)."""
        self.members[name][1].result()

    def finish(self, manifest: dict[str, Any]) -> Path:
        """Write the manifest with every member's size and sha256, fsync and give the archive
        its name; return it (``path``, or ``path`` with ``-2``, ``-3``, ... if another file
        took that name meanwhile: never replaced)."""
        members = {
            name: {"size": size, "sha256": digest.result()}
            for name, (size, digest) in self.members.items()
        }
        manifest_bytes = _manifest_bytes({**manifest, "members": members})
        if len(manifest_bytes) > self.reserve:
            raise ArchiveError(f"{self.path}: the manifest outgrew its place")
        manifest_bytes = manifest_bytes.ljust(self.reserve, b" ")
        manifest_sum = hashlib.sha256(manifest_bytes).hexdigest().encode() + b"\n"
        tail = _header(MANIFEST_SUM, len(manifest_sum)) + manifest_sum
        tail = tail.ljust(len(tail) - len(manifest_sum) + _padded(len(manifest_sum)), b"\0")
        end = self.offset + len(tail) + 2 * tarfile.BLOCKSIZE
        end = -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
        pwrite_all(self.fd, tail, self.offset)
        os.ftruncate(self.fd, end)  # the end-of-archive blocks and the record's padding: zeros
        head = _header(MANIFEST, self.reserve) + manifest_bytes
        pwrite_all(self.fd, head.ljust(len(head) + _padded(self.reserve) - self.reserve, b"\0"), 0)
        os.fsync(self.fd)
        if os.fstat(self.fd).st_size != end:
            raise OSError(errno.EIO, f"the archive is not {end} bytes long")
        self.path, moved = self._link()
        if not moved:
            self.temporary.unlink()
        self.close()
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path

    def _link(self) -> tuple[Path, bool]:
        """Give the complete archive the first of its names that no file has, exclusively;
        return it, and whether the temporary file was moved there (else it is a second link)."""
        stem = self.path.name.removesuffix(SUFFIX)
        for n in range(1, NAME_ATTEMPTS + 1):
            name = self.path.with_name(f"{stem}{SUFFIX}" if n == 1 else f"{stem}-{n}{SUFFIX}")
            try:
                os.link(self.temporary, name, follow_symlinks=False)
                return name, False
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                    raise
            # A file system without hard links: take the name with an empty file, then put
            # the archive over it (the name is ours; a crash between leaves an empty file).
            try:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                continue
            os.replace(self.temporary, name)
            return name, True
        raise OSError(errno.EEXIST, f"{NAME_ATTEMPTS} archives named {stem}-N{SUFFIX} exist")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        """Drop the archive being written."""
        self.close()
        self.temporary.unlink(missing_ok=True)


def write(path: Path, manifest: dict[str, Any], files: dict[str, Path]) -> None:
    """Write the archive to ``path`` (0600) atomically: a temporary name, fsync, rename."""
    writer = Writer(path, manifest_bound(manifest, list(files)))
    try:
        for name, source in files.items():
            writer.add(name, source)
        writer.finish(manifest)
    except BaseException:
        writer.abort()
        raise


@dataclass
class Archive:
    """A verified archive, open for reading its members."""

    path: Path
    manifest: dict[str, Any]
    tar: tarfile.TarFile

    def member(self, name: str) -> IO[bytes]:
        fh = self.tar.extractfile(name)
        if fh is None:
            raise ArchiveError(CORRUPT.format(file=self.path, why=f"{name} is not a file"))
        return fh

    def member_apart(self, name: str) -> IO[bytes]:
        """Return member ``name`` read with ``pread`` from the verified file: safe beside
        ``member`` in another thread (tarfile's readers share one file position)."""
        info = self.tar.getmember(name)
        fileobj = self.tar.fileobj
        if fileobj is None:
            raise ArchiveError(CORRUPT.format(file=self.path, why="the archive is closed"))
        raw = _Range(fileobj.fileno(), info.offset_data, info.size)
        return io.BufferedReader(raw, HASH_BLOCK)

    def extract(self, name: str, target: Path) -> None:
        """Copy member ``name`` to the new file ``target`` (0600), in the kernel."""
        info = self.tar.getmember(name)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with self.path.open("rb") as source:
                copy_range(source.fileno(), fd, info.size, info.offset_data, 0)
        finally:
            os.close(fd)


class _Range(io.RawIOBase):
    """``size`` bytes of an open file from ``start``, read with ``pread`` (no shared offset)."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        self.fd, self.start, self.size, self.at = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self.size - self.at)
        if wanted <= 0:
            return 0
        block = os.pread(self.fd, wanted, self.start + self.at)
        if not block:
            raise OSError(f"short read at {self.at} of {self.size} bytes")
        buffer[: len(block)] = block
        self.at += len(block)
        return len(block)


def read_manifest(path: Path) -> dict[str, Any]:
    """Return the manifest of the archive at ``path`` without checking the data members."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            fh = tar.extractfile(MANIFEST)
            if fh is None:
                raise KeyError(MANIFEST)
            return _parse_manifest(path, fh.read())
    except (tarfile.TarError, KeyError, EOFError, OSError, ValueError) as exc:
        raise ArchiveError(NOT_AN_ARCHIVE.format(file=path, why=exc)) from exc


def _parse_manifest(path: Path, data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ArchiveError(CORRUPT.format(file=path, why=f"{MANIFEST} is not JSON")) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArchiveError(NOT_AN_ARCHIVE.format(file=path, why=f"format {got!r}"))
    if manifest.get("version") not in READS:
        raise ArchiveError(
            UNSUPPORTED.format(file=path, format=FORMAT, version=manifest.get("version"))
        )
    return manifest


@contextmanager
def verified(path: Path, progress: Any = None) -> Iterator[Archive]:
    """Open the archive at ``path`` once every member matches the manifest's size and sha256.

    Raise ArchiveError for a missing file, a non-archive, a truncated archive or any member
    whose bytes differ from what the manifest recorded.
    """
    tar = _open(path)
    try:
        manifest = _verify(path, tar, progress)
        yield Archive(path, manifest, tar)
    finally:
        tar.close()


def checked(path: Path) -> dict[str, Any]:
    """Return the manifest of the archive at ``path`` once its structure matches it: every
    member there with the size the manifest says, the manifest matching its sha256. Member
    checksums are not read (``verified`` does): this reads the tar headers, not the data."""
    tar = _open(path)
    try:
        return _verify(path, tar, None, checksums=False)
    finally:
        tar.close()


def _open(path: Path) -> tarfile.TarFile:
    if not path.is_file():
        why = IS_A_DIRECTORY if path.is_dir() else NOT_A_FILE if path.exists() else NO_SUCH_FILE
        raise ArchiveError(NOT_AN_ARCHIVE.format(file=path, why=why))
    try:
        return tarfile.open(path, mode="r:")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(NOT_AN_ARCHIVE.format(file=path, why=exc)) from exc


def _verify(
    path: Path, tar: tarfile.TarFile, progress: Any, *, checksums: bool = True
) -> dict[str, Any]:
    try:
        members = {m.name: m for m in tar.getmembers()}
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(
            CORRUPT.format(file=path, why=f"unreadable ({exc}): truncated or damaged")
        ) from exc
    if MANIFEST not in members:
        raise ArchiveError(NOT_AN_ARCHIVE.format(file=path, why=f"no {MANIFEST}"))
    if MANIFEST_SUM not in members:
        why = f"no {MANIFEST_SUM}: the archive is truncated"
        raise ArchiveError(CORRUPT.format(file=path, why=why))
    manifest_bytes = _read(path, tar, MANIFEST)
    expected = _read(path, tar, MANIFEST_SUM).decode("ascii", "replace").strip()
    if hashlib.sha256(manifest_bytes).hexdigest() != expected:
        why = f"{MANIFEST} does not match {MANIFEST_SUM}"
        raise ArchiveError(CORRUPT.format(file=path, why=why))
    manifest = _parse_manifest(path, manifest_bytes)
    listed = manifest.get("members") or {}
    extra = set(members) - set(listed) - {MANIFEST, MANIFEST_SUM}
    if extra:
        why = f"members not in the manifest: {', '.join(sorted(extra))}"
        raise ArchiveError(CORRUPT.format(file=path, why=why))
    for name, expect in listed.items():
        if name not in members:
            why = f"member {name} is missing: the archive is truncated"
            raise ArchiveError(CORRUPT.format(file=path, why=why))
        if members[name].size != expect["size"]:
            why = f"member {name} is {members[name].size} bytes, the manifest says {expect['size']}"
            raise ArchiveError(CORRUPT.format(file=path, why=why))
        if checksums:
            _check_sum(path, tar, members[name], expect["sha256"], progress)
        elif members[name].offset_data + expect["size"] > path.stat().st_size:
            why = f"member {name} is cut short: the archive is truncated"
            raise ArchiveError(CORRUPT.format(file=path, why=why))
    return manifest


def _check_sum(
    path: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, expected: str, progress: Any
) -> None:
    digest = hashlib.sha256()
    fh = tar.extractfile(member)
    try:
        while fh is not None and (block := fh.read(HASH_BLOCK)):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    except (tarfile.TarError, EOFError, OSError) as exc:
        why = f"member {member.name} is cut short ({exc}): the archive is truncated"
        raise ArchiveError(CORRUPT.format(file=path, why=why)) from exc
    if digest.hexdigest() != expected:
        why = f"member {member.name} fails its sha256 check"
        raise ArchiveError(CORRUPT.format(file=path, why=why))


def _read(path: Path, tar: tarfile.TarFile, name: str) -> bytes:
    try:
        fh = tar.extractfile(name)
        if fh is None:
            raise KeyError(name)
        return fh.read()
    except (tarfile.TarError, EOFError, OSError, KeyError) as exc:
        raise ArchiveError(CORRUPT.format(file=path, why=f"{name} unreadable ({exc})")) from exc
