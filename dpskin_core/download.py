"""Fetch the official data files, verify them and unpack them (``dpskin download``).

A *source* (:class:`Source`) is a named list of :class:`RemoteFile` (url, filename,
expected checksum or None, unpack?). The built-in sources live in the ``DOWNLOADS``
registry; tests and mirrors may build their own :class:`Source` and pass it to
:func:`download` directly.

Guarantees, in order of importance:

* nothing bad is kept silently: a checksum mismatch or a broken zip raises
  :class:`DownloadError` naming the file, and the file is renamed ``<file>.corrupt``;
* an interrupted download resumes: bytes go to ``<file>.part`` and a rerun asks the server
  for the rest with ``Range: bytes=<size>-`` (206 -> append; 200 -> start again from zero);
* idempotent: verified files and already-unpacked zips are skipped, without any request,
  thanks to small stamp files in ``<dest>/.dpskin_download/``;
* offline-friendly: when the host cannot be reached the error says which files to put
  where by hand; a rerun then verifies and unpacks whatever is present.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional, Tuple, Union

from tqdm.auto import tqdm

from .errors import DownloadError
from .registry import Registry

__all__ = ["RemoteFile", "Source", "DOWNLOADS", "download", "verify_checksum", "file_digest",
           "safe_extract"]

CHUNK = 1 << 20  # bytes read / hashed / written at a time (1 MiB)
STAMP_DIR = ".dpskin_download"  # per-dest bookkeeping (verified + unpacked markers)
_USER_AGENT = "dpskin-download/1 (python urllib)"


# --------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class RemoteFile:
    """One file of a source.

    ``checksum`` is ``"md5:<hex>"`` or ``"sha256:<hex>"`` (a bare hex digest is read as md5 when
    32 characters long, sha256 when 64), or None when no published checksum exists: then
    integrity rests on Content-Length and, for zips, the CRC test of every member.
    """

    url: str
    filename: str
    checksum: Optional[str] = None
    unpack: bool = False


@dataclass(frozen=True)
class Source:
    """A named list of files that together make up one dataset."""

    name: str
    files: Tuple[RemoteFile, ...]
    homepage: str = ""

    def with_base_url(self, base_url: str) -> "Source":
        """The same source served from ``<base_url>/<filename>`` (a mirror, or a test server)."""
        base = base_url.rstrip("/")
        return replace(self, files=tuple(replace(f, url=f"{base}/{f.filename}") for f in self.files))


DOWNLOADS: Registry = Registry("download")

_ISIC2018 = "https://isic-challenge-data.s3.amazonaws.com/2018/"
# The ISIC archive publishes no checksums for the 2018 challenge files (none found on
# challenge.isic-archive.com nor in code using these URLs), so these rely on
# Content-Length + the zip CRC test (zipfile.testzip) instead.
DOWNLOADS.register("isic2018")(Source(
    name="isic2018",
    homepage="https://challenge.isic-archive.com/data/#2018",
    files=tuple(RemoteFile(_ISIC2018 + fn, fn, None, fn.endswith(".zip")) for fn in (
        "ISIC2018_Task3_Training_Input.zip",
        "ISIC2018_Task3_Training_GroundTruth.zip",
        "ISIC2018_Task3_Training_LesionGroupings.csv",
        "ISIC2018_Task3_Validation_Input.zip",
        "ISIC2018_Task3_Validation_GroundTruth.zip",
        "ISIC2018_Task3_Test_Input.zip",
        "ISIC2018_Task3_Test_GroundTruth.zip",
    )),
))

# URL and MD5 from MedMNIST's own INFO dict, medmnist/info.py (v3.0.2, INFO["dermamnist"];
# the MD5 is the same in v2.1.0), https://github.com/MedMNIST/MedMNIST.
DOWNLOADS.register("dermamnist")(Source(
    name="dermamnist",
    homepage="https://medmnist.com/",
    files=(RemoteFile("https://zenodo.org/records/10519652/files/dermamnist.npz?download=1",
                      "dermamnist.npz", "md5:0744692d530f8e62ec473284d019b0c7", False),),
))


# --------------------------------------------------------------------------- checksums
def _parse_checksum(checksum: str) -> Tuple[str, str]:
    algo, _, hexd = checksum.partition(":") if ":" in checksum else ("", "", checksum)
    hexd = hexd.strip().lower()
    if not algo:
        algo = {32: "md5", 64: "sha256"}.get(len(hexd), "")
    if algo not in ("md5", "sha256"):
        raise ValueError(f"checksum {checksum!r}: expected 'md5:<hex>' or 'sha256:<hex>'")
    return algo, hexd


def file_digest(path: Path, algo: str) -> str:
    """Hex digest of ``path`` computed in 1 MiB chunks (never loads the file at once)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: Path, checksum: str) -> Tuple[bool, str]:
    """``(ok, actual_hex)`` for ``path`` against ``checksum`` (``md5:..``/``sha256:..``)."""
    algo, expected = _parse_checksum(checksum)
    actual = file_digest(path, algo)
    return actual == expected, actual


# --------------------------------------------------------------------------- stamps
def _stamp(dest: Path, filename: str, kind: str) -> Path:
    return dest / STAMP_DIR / f"{filename}.{kind}"


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(stamp: Path, info: dict) -> None:
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(info))


def _read_stamp(stamp: Path) -> Optional[dict]:
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def _quarantine(path: Path) -> Path:
    """Rename a bad file to ``<file>.corrupt`` (``.corrupt.1``, ... if taken); never delete it."""
    target = path.with_name(path.name.replace(".part", "") + ".corrupt") \
        if path.name.endswith(".part") else path.with_name(path.name + ".corrupt")
    n = 0
    while target.exists():
        n += 1
        target = target.with_name(f"{target.name.split('.corrupt')[0]}.corrupt.{n}")
    os.replace(path, target)
    return target


# --------------------------------------------------------------------------- zips
def safe_extract(zip_path: Path, dest: Path) -> int:
    """Extract ``zip_path`` into ``dest``; refuses (before writing anything) absolute paths,
    ``..`` components and symlinks. Returns the number of files written."""
    root = dest.resolve()
    with zipfile.ZipFile(zip_path) as z:
        members = z.infolist()
        for m in members:
            p = PurePosixPath(m.filename.replace("\\", "/"))
            is_link = (m.external_attr >> 16) & 0o170000 == 0o120000
            target = (root / m.filename).resolve()
            drive = bool(p.parts) and ":" in p.parts[0]  # "C:/..." on Windows
            if (p.is_absolute() or ".." in p.parts or drive or is_link
                    or not (target == root or root in target.parents)):
                raise DownloadError(f"{zip_path}: refusing to unpack unsafe member {m.filename!r} "
                                    f"(it would land outside {dest}); the archive was not unpacked")
        n = 0
        for m in members:
            z.extract(m, root)
            n += not m.is_dir()
    return n


def _check_zip(path: Path) -> Optional[str]:
    """None when every member's CRC is right, else a reason."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        return None if bad is None else f"CRC error in member {bad!r}"
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"not a valid zip file ({e})"


# --------------------------------------------------------------------------- transfer
class _Unreachable(Exception):
    """The request itself failed (no connection / HTTP error): the manual-install case."""


def _fetch(url: str, part: Path, *, timeout: float, progress: bool, label: str) -> None:
    """Download ``url`` into ``part``, resuming from its current size when the server allows."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # we already have every byte: let verification judge
            return
        raise _Unreachable(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException,
            OSError) as e:
        reason = getattr(e, "reason", e)
        raise _Unreachable(f"{type(reason).__name__}: {reason}") from None

    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if resp.status == 206 and have:
            start = _content_range_start(resp.headers.get("Content-Range", ""))
            if start != have:  # server sent some other range: do not append it
                raise DownloadError(f"{url}: server answered Range bytes={have}- with "
                                    f"Content-Range {resp.headers.get('Content-Range')!r}; "
                                    f"delete {part} and rerun")
            mode, total = "ab", (have + length if length is not None else None)
        else:  # 200: full body (server ignored or does not support Range) -> from zero
            mode, have, total = "wb", 0, length
        written = have
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=label, disable=not progress, leave=False)
        try:
            with open(part, mode) as f:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    written += len(block)
                    bar.update(len(block))
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(f"{url}: connection lost after {written} bytes ({e}); "
                                f"the partial file {part} is kept, rerun to resume") from None
        finally:
            bar.close()
    if total is not None and written != total:
        raise DownloadError(f"{url}: received {written} of {total} bytes (Content-Length); "
                            f"the partial file {part} is kept, rerun to resume")


def _content_range_start(value: str) -> Optional[int]:
    # "bytes 100-199/200" -> 100
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _manual_help(source: Source, dest: Path, missing: Iterable[RemoteFile]) -> str:
    lines = "\n".join(f"  {f.filename}    (from {f.url})" for f in missing)
    return (f"To install by hand, download these files into {dest}:\n{lines}\n"
            f"then rerun: `dpskin download {source.name} --dest {dest}` "
            f"(files present are verified and unpacked; nothing is downloaded again)")


# --------------------------------------------------------------------------- main entry
def _verify(f: RemoteFile, path: Path, final: Path) -> None:
    """Raise DownloadError (after quarantining ``path``) unless it matches ``f``."""
    if f.checksum:
        ok, actual = verify_checksum(path, f.checksum)
        if not ok:
            bad = _quarantine(path)
            raise DownloadError(f"{f.filename}: checksum mismatch (expected {f.checksum}, got "
                                f"{_parse_checksum(f.checksum)[0]}:{actual}); the bad file was "
                                f"kept as {bad}; delete it and rerun to download again")
    if f.filename.lower().endswith(".zip"):
        why = _check_zip(path)
        if why:
            bad = _quarantine(path)
            raise DownloadError(f"{f.filename}: {why}; the bad file was kept as {bad}; "
                                f"delete it and rerun to download again")
    if path != final:
        os.replace(path, final)


def download(name: Union[str, Source], dest: Path, *, base_url: Optional[str] = None,
             timeout: float = 30, progress: bool = True) -> Path:
    """Download, verify and unpack source ``name`` into ``dest``; returns ``dest``.

    ``name`` is a key of ``DOWNLOADS`` (``isic2018``, ``dermamnist``) or a :class:`Source`.
    ``base_url`` replaces the host/prefix of every file (``<base_url>/<filename>``).
    ``timeout`` is the socket timeout in seconds. Files already verified and zips already
    unpacked are skipped without any network request; files placed in ``dest`` by hand are
    verified and unpacked. Raises :class:`UnknownNameError` for an unknown name and
    :class:`DownloadError` (offline, HTTP error, truncated transfer, checksum mismatch, unsafe
    zip) with a message that says what to do.
    """
    source = name if isinstance(name, Source) else DOWNLOADS.get(name)
    if base_url:
        source = source.with_base_url(base_url)
    dest = Path(dest).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)

    for f in source.files:
        final = dest / f.filename
        unpacked = _stamp(dest, f.filename, "unpacked")
        if f.unpack and unpacked.exists():
            continue  # already verified and unpacked earlier (the zip itself may be gone)
        verified = _stamp(dest, f.filename, "verified")
        stamp = _read_stamp(verified)
        if not (final.is_file() and stamp == {**_fingerprint(final), "checksum": f.checksum}):
            if not final.is_file():
                part = final.with_name(final.name + ".part")
                try:
                    _fetch(f.url, part, timeout=timeout, progress=progress, label=f.filename)
                except _Unreachable as e:
                    missing = [g for g in source.files if not (dest / g.filename).is_file()
                               and not _stamp(dest, g.filename, "unpacked").exists()]
                    raise DownloadError(
                        f"cannot download {f.url} ({e}): this machine seems offline or the host "
                        f"is unreachable (or refused the file).\n{_manual_help(source, dest, missing)}"
                    ) from None
                _verify(f, part, final)
            else:  # present (placed by hand, or stamp lost): verify before trusting it
                _verify(f, final, final)
            _write_stamp(verified, {**_fingerprint(final), "checksum": f.checksum})
        if f.unpack:
            try:
                safe_extract(final, dest)
            except zipfile.BadZipFile as e:
                raise DownloadError(f"{final}: cannot unpack ({e})") from None
            _write_stamp(unpacked, {**_fingerprint(final), "checksum": f.checksum})
    return dest
