"""Fetch the official data files, verify them and unpack them (``dpskin download``).

A *source* (:class:`Source`) is a named list of :class:`RemoteFile` (url, filename,
expected checksum or None, unpack?, subset tag). The built-in sources live in the ``DOWNLOADS``
registry (``isic2018``: the official Task 3 files; ``dermamnist``: MedMNIST's npz files);
tests and mirrors may build their own :class:`Source` (or derive one with
:meth:`Source.with_checksums` / :meth:`Source.with_base_url`) and pass it to :func:`download`.

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
from typing import Iterable, Mapping, Optional, Tuple, Union

from tqdm.auto import tqdm

from ..errors import ConfigError, DownloadError
from ..registry import Registry

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
    ``subset`` tags the file for ``download(..., subsets=...)`` ("" = always fetched).
    """

    url: str
    filename: str
    checksum: Optional[str] = None
    unpack: bool = False
    subset: str = ""


@dataclass(frozen=True)
class Source:
    """A named list of files that together make up one dataset.

    ``default_subsets`` are fetched when ``download`` gets ``subsets=None`` (empty: all).
    """

    name: str
    files: Tuple[RemoteFile, ...]
    homepage: str = ""
    default_subsets: Tuple[str, ...] = ()

    @property
    def subsets(self) -> Tuple[str, ...]:
        """Every subset tag of the files, in file order."""
        return tuple(dict.fromkeys(f.subset for f in self.files if f.subset))

    def with_base_url(self, base_url: str) -> "Source":
        """The same source served from ``<base_url>/<filename>`` (a mirror, or a test server)."""
        base = base_url.rstrip("/")
        return replace(self, files=tuple(replace(f, url=f"{base}/{f.filename}") for f in self.files))

    def with_checksums(self, checksums: Mapping[str, Optional[str]]) -> "Source":
        """The same source with the checksums of the files named in ``checksums`` replaced."""
        unknown = set(checksums) - {f.filename for f in self.files}
        if unknown:
            raise ConfigError(f"source {self.name!r} has no file(s) {sorted(unknown)}")
        return replace(self, files=tuple(replace(f, checksum=checksums.get(f.filename, f.checksum))
                                         for f in self.files))

    def select(self, subsets: Union[None, str, Iterable[str]] = None) -> "Source":
        """Only the files of ``subsets`` (names or one comma-separated string, case-insensitive;
        None: ``default_subsets``) plus the untagged ones. Unknown names raise ConfigError."""
        known = self.subsets
        if subsets is None:
            wanted = set(self.default_subsets or known)
        else:
            names = subsets.split(",") if isinstance(subsets, str) else list(subsets)
            by_lower = {k.lower(): k for k in known}
            wanted = set()
            for n in (str(n).strip() for n in names):
                if n.lower() not in by_lower:
                    raise ConfigError(f"source {self.name!r} has no subset {n!r}; "
                                      f"known: {', '.join(known) or '(none)'}")
                wanted.add(by_lower[n.lower()])
        return replace(self, files=tuple(f for f in self.files if not f.subset or f.subset in wanted))


DOWNLOADS: Registry = Registry("download")

_ISIC2018 = "https://isic-challenge-data.s3.amazonaws.com/2018/"
# File names as linked from https://challenge.isic-archive.com/data/#2018 (and used verbatim by
# many public download scripts). The ISIC archive itself publishes no checksums for them.
# The one checksum pinned below comes from two independent public scripts that agree:
#   sunlabuiuc/PyHealth, pyhealth/datasets/isic2018.py (_CHECKSUMS, "downloaded and computed"),
#   and a PowerShell download script ($expectedGroundTruthMd5),
# both computed on the copy at isic-archive.s3.amazonaws.com/challenges/2018/ (the older
# address of the same challenge bucket). The same script's MD5 for the LesionGroupings CSV
# (9517b6aa...) does NOT match the copy in this project's shared data (bda80c21...), so that
# file gets no pin; it and the other files rely on Content-Length and, for zips, the CRC
# test of every member (zipfile.testzip).
_ISIC_MD5 = {"ISIC2018_Task3_Training_GroundTruth.zip": "md5:8302427e4ce0c107559531b9f444abe9"}
DOWNLOADS.register("isic2018")(Source(
    name="isic2018",
    homepage="https://challenge.isic-archive.com/data/#2018",
    default_subsets=("Training", "Validation", "Test"),
    files=tuple(RemoteFile(_ISIC2018 + fn, fn, _ISIC_MD5.get(fn), fn.endswith(".zip"),
                           fn.split("_")[2]) for fn in (
        "ISIC2018_Task3_Training_Input.zip",
        "ISIC2018_Task3_Training_GroundTruth.zip",
        "ISIC2018_Task3_Training_LesionGroupings.csv",
        "ISIC2018_Task3_Validation_Input.zip",
        "ISIC2018_Task3_Validation_GroundTruth.zip",
        "ISIC2018_Task3_Test_Input.zip",
        "ISIC2018_Task3_Test_GroundTruth.zip",
    )),
))

# URLs and MD5s from MedMNIST's own INFO["dermamnist"] (keys url/MD5, url_64/MD5_64, ...),
# medmnist/info.py of medmnist 3.0.2, https://github.com/MedMNIST/MedMNIST (the 28 px MD5 is
# the same in 2.1.0, whose URL was zenodo.org/record/6496656). Subset = image side in px.
_ZENODO = "https://zenodo.org/records/10519652/files/"
_DERMA_MD5 = {"28": "0744692d530f8e62ec473284d019b0c7", "64": "b70a2f5635c6199aeaa28c31d7202e1f",
              "128": "2defd784463fa5243564e855ed717de1", "224": "8974907d8e169bef5f5b96bc506ae45d"}
DOWNLOADS.register("dermamnist")(Source(
    name="dermamnist",
    homepage="https://medmnist.com/",
    default_subsets=("28",),
    files=tuple(RemoteFile(f"{_ZENODO}{fn}?download=1", fn, f"md5:{md5}", False, px)
                for px, md5 in _DERMA_MD5.items()
                for fn in ["dermamnist.npz" if px == "28" else f"dermamnist_{px}.npz"]),
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
def _top_level(names: Iterable[str]) -> list:
    """The distinct first path components of zip member names (``ISIC2018_Task3_Test_Input``)."""
    return sorted({n.replace("\\", "/").lstrip("/").split("/")[0] for n in names} - {""})


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


def _is_unpacked(dest: Path, filename: str) -> bool:
    """The unpack stamp exists and every top-level entry it recorded is still there."""
    stamp = _read_stamp(_stamp(dest, filename, "unpacked"))
    return bool(stamp) and all((dest / t).exists() for t in stamp.get("top", []))


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
        if e.code == 416 and have:  # Range starts at/after the end: .part complete or too long
            total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) != have:  # longer than the file: not our bytes
                bad = _quarantine(part)
                raise DownloadError(f"{url}: the partial file had {have} bytes but the file has "
                                    f"only {total}; it was kept as {bad}; rerun to download "
                                    f"again from zero") from None
            return  # we already have every byte: let verification judge
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
    lines = "\n".join(f"  {f.url}\n      -> {dest / f.filename}" for f in missing)
    chosen = source.subsets  # after select(): only the chosen ones
    opt = f" --subsets {','.join(chosen)}" if set(chosen) != set(source.default_subsets or chosen) else ""
    page = f" (dataset page: {source.homepage})" if source.homepage else ""
    return (f"To install by hand, download each file below{page} and place it at the path "
            f"shown (same file name, directly in {dest}; leave zips zipped):\n{lines}\n"
            f"then rerun: `dpskin download {source.name} --dest {dest}{opt}` "
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
             subsets: Union[None, str, Iterable[str]] = None, timeout: float = 30,
             progress: bool = True) -> Path:
    """Download, verify and unpack source ``name`` into ``dest``; returns ``dest`` (resolved).

    ``name`` is a key of ``DOWNLOADS`` (``isic2018``, ``dermamnist``) or a :class:`Source`.
    ``base_url`` replaces the host/prefix of every file (``<base_url>/<filename>``).
    ``subsets`` picks the files: isic2018 ``Training``/``Validation``/``Test`` (default all);
    dermamnist the image side ``28``/``64``/``128``/``224`` (default ``28``: dermamnist.npz);
    a list or one comma-separated string. ``timeout`` is the socket timeout in seconds.
    ``progress`` shows a tqdm bar of bytes per file.

    Zips unpack as published (each into its own top folder, e.g.
    ``<dest>/ISIC2018_Task3_Training_Input/`` and
    ``<dest>/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv``);
    the zips are kept. Files already verified and zips already unpacked are skipped without any
    network request; files placed in ``dest`` by hand are verified and unpacked. Raises
    :class:`UnknownNameError` for an unknown name, :class:`ConfigError` for an unknown subset and
    :class:`DownloadError` (offline, HTTP error, truncated transfer, checksum mismatch, broken or
    unsafe zip) with a message that says what to do.
    """
    source = name if isinstance(name, Source) else DOWNLOADS.get(name)
    source = source.select(subsets)
    if base_url:
        source = source.with_base_url(base_url)
    dest = Path(dest).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)

    for f in source.files:
        final = dest / f.filename
        if f.unpack and _is_unpacked(dest, f.filename):
            continue  # already verified and unpacked earlier (the zip itself may be gone)
        verified = _stamp(dest, f.filename, "verified")
        if not (final.is_file()
                and _read_stamp(verified) == {**_fingerprint(final), "checksum": f.checksum}):
            if not final.is_file():
                part = final.with_name(final.name + ".part")
                try:
                    _fetch(f.url, part, timeout=timeout, progress=progress, label=f.filename)
                except _Unreachable as e:
                    missing = [g for g in source.files if not (dest / g.filename).is_file()
                               and not (g.unpack and _is_unpacked(dest, g.filename))]
                    raise DownloadError(
                        f"cannot download {f.url} ({e}): this machine seems offline or the host "
                        f"is unreachable (or refused the file).\n{_manual_help(source, dest, missing)}"
                    ) from None
                _verify(f, part, final)
            else:  # present (placed by hand, or stamp lost/stale): verify before trusting it
                _verify(f, final, final)
            _write_stamp(verified, {**_fingerprint(final), "checksum": f.checksum})
        if f.unpack:
            try:
                with zipfile.ZipFile(final) as z:
                    top = _top_level(z.namelist())
                safe_extract(final, dest)
            except zipfile.BadZipFile as e:
                raise DownloadError(f"{final}: cannot unpack ({e})") from None
            _write_stamp(_stamp(dest, f.filename, "unpacked"),
                         {**_fingerprint(final), "checksum": f.checksum, "top": top})
    return dest
