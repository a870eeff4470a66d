"""dpskin_core.download against a local HTTP server on 127.0.0.1 (no internet needed)."""
import hashlib
import http.server
import io
import re
import socket
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dpskin_core.data import read_isic2018
from dpskin_core.data.download import DOWNLOADS, RemoteFile, Source, download, safe_extract
from dpskin_core.errors import ConfigError, DownloadError, UnknownNameError

ISIC_FILES = [f.filename for f in DOWNLOADS.get("isic2018").files]


# --------------------------------------------------------------------------- local server
class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.root``; honours ``Range: bytes=N-[M]`` unless ``server.honour_range`` is
    False; logs (path, Range header) of every request to ``server.log``."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        path = srv.root / self.path.lstrip("/").split("?")[0]
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if srv.honour_range and m:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start:end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.truncate_at is not None:  # promise len(body) bytes, send fewer, hang up
            self.wfile.write(body[:srv.truncate_at])
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def serve(tmp_path):
    """serve(honour_range=True) -> (base_url, server) for the folder tmp_path/'www'."""
    servers = []

    def start(honour_range=True):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        srv.root, srv.log, srv.honour_range = tmp_path / "www", [], honour_range
        srv.truncate_at = None
        srv.root.mkdir(exist_ok=True)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 whose port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _zip_folder(folder: Path, zip_path: Path) -> None:
    """Zip ``folder`` keeping it as the top-level directory, as the official ISIC zips do."""
    with zipfile.ZipFile(zip_path, "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, p.relative_to(folder.parent).as_posix())


@pytest.fixture
def isic_www(tmp_path, isic_layout):
    """tmp_path/'www' holding tiny versions of all 7 official isic2018 files."""
    www = tmp_path / "www"
    www.mkdir()
    per_class = {c: 1 for c in ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")}
    for subset in ("Training", "Validation", "Test"):
        root = isic_layout(f"src_{subset}", per_class=per_class, subset=subset,
                           csv_in_subfolder=True, size=(8, 6))
        for part in ("Input", "GroundTruth"):
            name = f"ISIC2018_Task3_{subset}_{part}"
            _zip_folder(root / name, www / f"{name}.zip")
        if subset == "Training":
            (www / "ISIC2018_Task3_Training_LesionGroupings.csv").write_bytes(
                (root / "ISIC2018_Task3_Training_LesionGroupings.csv").read_bytes())
    assert sorted(p.name for p in www.iterdir()) == sorted(ISIC_FILES)
    return www


def _isic_source(www: Path, algo: str = "sha256") -> Source:
    """The registered isic2018 source, its checksums replaced by those of the fixture files."""
    return DOWNLOADS.get("isic2018").with_checksums(
        {f: f"{algo}:{hashlib.new(algo, (www / f).read_bytes()).hexdigest()}" for f in ISIC_FILES})


def _fake_npz(path: Path) -> bytes:
    buf = io.BytesIO()
    arrays = {}
    for s, n in (("train", 5), ("val", 2), ("test", 3)):
        arrays[f"{s}_images"] = np.zeros((n, 28, 28, 3), np.uint8)
        arrays[f"{s}_labels"] = np.arange(n, dtype=np.uint8).reshape(-1, 1) % 7
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _npz_source(base: str, data: bytes, algo: str = "sha256") -> Source:
    digest = hashlib.new(algo, data).hexdigest()
    return Source("fake_npz", (RemoteFile(f"{base}/dermamnist.npz", "dermamnist.npz",
                                          f"{algo}:{digest}", False),))


# --------------------------------------------------------------------------- tests
def test_isic2018_full_download_verify_unpack_then_no_request(serve, isic_www, tmp_path):
    base, srv = serve()
    dest = tmp_path / "dest"
    out = download(_isic_source(isic_www), dest, base_url=base, progress=False)
    assert out == dest.resolve()
    assert sorted(p for p, _ in srv.log) == sorted(f"/{f}" for f in ISIC_FILES)
    # official layout, read by the loader (GroundTruth CSVs inside their own folder)
    assert (dest / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv").is_file()
    for subset in ("Training", "Validation", "Test"):
        assert len(list((dest / f"ISIC2018_Task3_{subset}_Input").glob("*.jpg"))) == 7
        assert len(read_isic2018(dest, subset)) == 7
    for f in ISIC_FILES:  # byte-identical to what was served, zips kept
        assert (dest / f).read_bytes() == (isic_www / f).read_bytes()
    assert not list(dest.glob("*.part")) and not list(dest.glob("*.corrupt"))
    # a second call verifies nothing over the network: no request at all
    srv.log.clear()
    download(_isic_source(isic_www), dest, base_url=base, progress=False)
    assert srv.log == []


def test_isic2018_registry_pins_groundtruth_md5(serve, isic_www, tmp_path):
    """The registered source checks the published MD5 of the training ground truth zip: the
    fixture zip is not the real one, so it is refused and kept as .corrupt."""
    base, _ = serve()
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError) as e:
        download("isic2018", dest, base_url=base, subsets="Training", progress=False)
    msg = str(e.value)
    assert "ISIC2018_Task3_Training_GroundTruth.zip: checksum mismatch" in msg
    assert "8302427e4ce0c107559531b9f444abe9" in msg
    assert (dest / "ISIC2018_Task3_Training_GroundTruth.zip.corrupt").is_file()
    assert (dest / "ISIC2018_Task3_Training_Input").is_dir()  # files before it were fine


def test_subsets_select_files(serve, isic_www, tmp_path):
    base, srv = serve()
    dest = tmp_path / "dest"
    download(_isic_source(isic_www), dest, base_url=base, subsets=["test"], progress=False)
    assert sorted(p for p, _ in srv.log) == ["/ISIC2018_Task3_Test_GroundTruth.zip",
                                              "/ISIC2018_Task3_Test_Input.zip"]
    assert len(read_isic2018(dest, "Test")) == 7
    assert not (dest / "ISIC2018_Task3_Training_Input").exists()
    srv.log.clear()  # adding a subset later fetches only the new files
    download(_isic_source(isic_www), dest, base_url=base, subsets="Test,Validation", progress=False)
    assert sorted(p for p, _ in srv.log) == ["/ISIC2018_Task3_Validation_GroundTruth.zip",
                                              "/ISIC2018_Task3_Validation_Input.zip"]
    with pytest.raises(ConfigError, match=r"no subset 'Train'.*Training, Validation, Test"):
        download("isic2018", dest, subsets="Train", progress=False)


def test_dermamnist_sizes_from_medmnist_info():
    src = DOWNLOADS.get("dermamnist")
    assert src.subsets == ("28", "64", "128", "224")
    assert [f.filename for f in src.select().files] == ["dermamnist.npz"]
    assert [f.filename for f in src.select("224,64").files] == ["dermamnist_64.npz",
                                                                 "dermamnist_224.npz"]
    f224 = src.select("224").files[0]
    assert f224.url == "https://zenodo.org/records/10519652/files/dermamnist_224.npz?download=1"
    assert f224.checksum == "md5:8974907d8e169bef5f5b96bc506ae45d"
    with pytest.raises(ConfigError, match="has no file"):
        src.with_checksums({"nope.npz": None})


def test_unpacked_folder_deleted_is_unpacked_again_without_request(serve, isic_www, tmp_path):
    import shutil

    base, srv = serve()
    dest = tmp_path / "dest"
    download(_isic_source(isic_www), dest, base_url=base, subsets="Test", progress=False)
    shutil.rmtree(dest / "ISIC2018_Task3_Test_Input")
    srv.log.clear()
    download(_isic_source(isic_www), dest, base_url=base, subsets="Test", progress=False)
    assert srv.log == []  # the kept, verified zip is unpacked again
    assert len(read_isic2018(dest, "Test")) == 7


def test_dermamnist_registry_checksum_mismatch_keeps_corrupt_file(serve, tmp_path):
    base, _ = serve()
    data = _fake_npz(tmp_path / "www" / "dermamnist.npz")  # not the real file: wrong MD5
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError) as e:
        download("dermamnist", dest, base_url=base, progress=False)
    msg = str(e.value)
    assert "dermamnist.npz" in msg and "0744692d530f8e62ec473284d019b0c7" in msg
    assert hashlib.md5(data).hexdigest() in msg
    assert (dest / "dermamnist.npz.corrupt").read_bytes() == data
    assert not (dest / "dermamnist.npz").exists()


def test_custom_source_checksum_ok_md5(serve, tmp_path):
    base, srv = serve()
    data = _fake_npz(tmp_path / "www" / "dermamnist.npz")
    dest = tmp_path / "dest"
    download(_npz_source(base, data, "md5"), dest, progress=False)
    assert (dest / "dermamnist.npz").read_bytes() == data
    with np.load(dest / "dermamnist.npz") as z:
        assert z["test_images"].shape == (3, 28, 28, 3)
    assert srv.log == [("/dermamnist.npz", None)]


@pytest.mark.parametrize("honour_range", [True, False])
def test_resume_from_part(serve, tmp_path, honour_range):
    base, srv = serve(honour_range=honour_range)
    data = _fake_npz(tmp_path / "www" / "dermamnist.npz")
    dest = tmp_path / "dest"
    dest.mkdir()
    half = len(data) // 2
    # with a Range-honouring server the first half must be kept; a server ignoring Range
    # sends everything again, so even garbage in .part must end up replaced
    (dest / "dermamnist.npz.part").write_bytes(data[:half] if honour_range else b"x" * half)
    download(_npz_source(base, data), dest, progress=False)
    assert srv.log == [("/dermamnist.npz", f"bytes={half}-")]
    assert (dest / "dermamnist.npz").read_bytes() == data
    assert not (dest / "dermamnist.npz.part").exists()


def test_truncated_transfer_keeps_part_then_resumes(serve, tmp_path):
    base, srv = serve()
    data = _fake_npz(tmp_path / "www" / "dermamnist.npz")
    dest = tmp_path / "dest"
    srv.truncate_at = 1000
    with pytest.raises(DownloadError, match="rerun to resume"):
        download(_npz_source(base, data), dest, progress=False)
    assert (dest / "dermamnist.npz.part").read_bytes() == data[:1000]
    srv.truncate_at = None
    download(_npz_source(base, data), dest, progress=False)
    assert srv.log[-1] == ("/dermamnist.npz", "bytes=1000-")
    assert (dest / "dermamnist.npz").read_bytes() == data
    # a complete .part (server answers 416 to the Range) is verified and accepted
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    (dest2 / "dermamnist.npz.part").write_bytes(data)
    download(_npz_source(base, data), dest2, progress=False)
    assert (dest2 / "dermamnist.npz").read_bytes() == data


def test_part_longer_than_file_is_kept_as_corrupt(serve, tmp_path):
    base, srv = serve()
    data = _fake_npz(tmp_path / "www" / "dermamnist.npz")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "dermamnist.npz.part").write_bytes(data + b"junk")
    with pytest.raises(DownloadError, match="kept as .*dermamnist.npz.corrupt"):
        download(_npz_source(base, data), dest, progress=False)
    assert (dest / "dermamnist.npz.corrupt").read_bytes() == data + b"junk"
    download(_npz_source(base, data), dest, progress=False)  # rerun: from zero
    assert srv.log[-1] == ("/dermamnist.npz", None)
    assert (dest / "dermamnist.npz").read_bytes() == data


def test_unreachable_host_says_offline_and_how_to_install_by_hand(tmp_path):
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError) as e:
        download("isic2018", dest, base_url=closed_port_url(), progress=False, timeout=5)
    msg = str(e.value)
    assert "offline" in msg and "unreachable" in msg
    for f in ISIC_FILES:  # every file: where from, and the exact place to put it
        assert f"/{f}\n" in msg
        assert f"-> {dest.resolve() / f}" in msg
    assert "then rerun: `dpskin download isic2018 --dest" in msg
    assert "files present are verified and unpacked" in msg


def test_http_404_is_a_clear_download_error(serve, tmp_path):
    base, _ = serve()  # empty folder
    with pytest.raises(DownloadError, match=r"HTTP 404.*\n.*download each file below"):
        download("dermamnist", tmp_path / "dest", base_url=base, progress=False)


def test_files_placed_by_hand_are_verified_and_unpacked_offline(isic_www, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    for f in ISIC_FILES:
        (dest / f).write_bytes((isic_www / f).read_bytes())
    download(_isic_source(isic_www), dest, base_url=closed_port_url(), progress=False)  # no network
    assert len(read_isic2018(dest, "Training")) == 7


def test_broken_zip_placed_by_hand_is_kept_as_corrupt(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a.zip").write_bytes(b"this is not a zip")
    src = Source("broken", (RemoteFile(closed_port_url() + "/a.zip", "a.zip", None, True),))
    with pytest.raises(DownloadError, match="a.zip: not a valid zip"):
        download(src, dest, progress=False)
    assert (dest / "a.zip.corrupt").read_bytes() == b"this is not a zip"


def test_zip_path_traversal_rejected(serve, tmp_path):
    base, _ = serve()
    with zipfile.ZipFile(tmp_path / "www" / "evil.zip", "w") as z:
        z.writestr("ok/file.txt", "fine")
        z.writestr("../escaped.txt", "evil")
    dest = tmp_path / "dest"
    src = Source("evil", (RemoteFile(f"{base}/evil.zip", "evil.zip", None, True),))
    with pytest.raises(DownloadError, match="unsafe member '../escaped.txt'"):
        download(src, dest, progress=False)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (dest / "ok").exists()  # nothing extracted at all
    with pytest.raises(DownloadError, match="unsafe"):
        with zipfile.ZipFile(tmp_path / "abs.zip", "w") as z:
            z.writestr("/etc/abs.txt", "evil")
        safe_extract(tmp_path / "abs.zip", dest)


def test_unknown_source_name():
    with pytest.raises(UnknownNameError, match="isic2018"):
        download("imagenet", Path("/nonexistent"), progress=False)


def test_cli_download_offline_exits_2_with_clear_message(tmp_path, capsys):
    from dpskin_core.cli import main

    d = tmp_path / "dest"
    rc = main(["download", "dermamnist", "--dest", str(d), "--base-url", closed_port_url()])
    err = capsys.readouterr().err
    assert rc == 2
    assert "offline" in err and "dermamnist.npz" in err and str(d.resolve()) in err
