"""The archive file: a tar of ``manifest.json``, data members and ``manifest.sha256``.

Written to a hidden temporary name in the target directory with mode 0600, fsynced, then
renamed, so a crash never leaves a partial archive under a backup's name. Verification reads
every member and compares its size and sha256 with the manifest before anything trusts it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

FORMAT = "termsys-backup"
VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"
SUFFIX = ".tar"
HASH_BLOCK = 1024 * 1024

NOT_AN_ARCHIVE = "{file}: not a termsys backup archive ({why}); nothing changed."
CORRUPT = "{file}: corrupt archive: {why}; nothing changed."
UNSUPPORTED = (
    "{file}: archive format {format!r} version {version!r}; this termsys reads "
    f"{FORMAT!r} version {VERSION}. Nothing changed."
)


class ArchiveError(Exception):
    """The file is not a usable archive; the message says why and what to do."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class _Hashing:
    """A file read for the archive, hashed on the way: one pass per member."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh, self.digest = fh, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        block = self.fh.read(size)
        self.digest.update(block)
        return block


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n"


def write(path: Path, manifest: dict[str, Any], files: dict[str, Path]) -> None:
    """Write the archive to ``path`` (0600) atomically: a temporary name, fsync, rename.

    ``manifest.json`` comes first but holds every member's sha256, so its place is kept and it
    is written last: its size is bounded beforehand (sizes of 16 digits), and the manifest is
    padded to that size with spaces, which JSON ignores. Members are hashed while copied in.
    """
    bound = {name: {"size": 10**15, "sha256": "0" * 64} for name in files}
    reserved = len(_manifest_bytes({**manifest, "members": bound}))
    header = _info(MANIFEST, reserved).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "strict")
    head = len(header) + -(-reserved // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w+b") as raw:
            raw.write(b"\0" * head)
            members: dict[str, dict[str, Any]] = {}
            with tarfile.open(
                fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, copybufsize=HASH_BLOCK
            ) as tar:  # 1 MiB reads (as verify does), not tarfile's 16 KiB
                for name, source in files.items():
                    info = tar.gettarinfo(str(source), arcname=name)
                    info.mode, info.uid, info.gid, info.uname, info.gname = 0o600, 0, 0, "", ""
                    with source.open("rb") as fh:
                        hashing = _Hashing(fh)
                        tar.addfile(info, hashing)  # type: ignore[arg-type]
                    members[name] = {"size": info.size, "sha256": hashing.digest.hexdigest()}
                manifest_bytes = _manifest_bytes({**manifest, "members": members})
                if len(manifest_bytes) > reserved:  # cannot happen: sizes stay below 10**15
                    raise ArchiveError(f"{path}: the manifest outgrew its place")
                manifest_bytes = manifest_bytes.ljust(reserved, b" ")
                manifest_sum = hashlib.sha256(manifest_bytes).hexdigest().encode() + b"\n"
                _add_bytes(tar, MANIFEST_SUM, manifest_sum)
            raw.seek(0)
            raw.write(header)
            raw.write(manifest_bytes.ljust(head - len(header), b"\0"))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _info(name: str, size: int) -> tarfile.TarInfo:
    import time

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(time.time())
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    tar.addfile(_info(name, len(data)), io.BytesIO(data))


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
    if manifest.get("version") != VERSION:
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
    if not path.is_file():
        raise ArchiveError(NOT_AN_ARCHIVE.format(file=path, why="no such file"))
    try:
        tar = tarfile.open(path, mode="r:")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(NOT_AN_ARCHIVE.format(file=path, why=exc)) from exc
    try:
        manifest = _verify(path, tar, progress)
        yield Archive(path, manifest, tar)
    finally:
        tar.close()


def _verify(path: Path, tar: tarfile.TarFile, progress: Any) -> dict[str, Any]:
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
        digest = hashlib.sha256()
        fh = tar.extractfile(members[name])
        try:
            while fh is not None and (block := fh.read(HASH_BLOCK)):
                digest.update(block)
                if progress is not None:
                    progress(len(block))
        except (tarfile.TarError, EOFError, OSError) as exc:
            why = f"member {name} is cut short ({exc}): the archive is truncated"
            raise ArchiveError(CORRUPT.format(file=path, why=why)) from exc
        if digest.hexdigest() != expect["sha256"]:
            why = f"member {name} fails its sha256 check"
            raise ArchiveError(CORRUPT.format(file=path, why=why))
    return manifest


def _read(path: Path, tar: tarfile.TarFile, name: str) -> bytes:
    try:
        fh = tar.extractfile(name)
        if fh is None:
            raise KeyError(name)
        return fh.read()
    except (tarfile.TarError, EOFError, OSError, KeyError) as exc:
        raise ArchiveError(CORRUPT.format(file=path, why=f"{name} unreadable ({exc})")) from exc
