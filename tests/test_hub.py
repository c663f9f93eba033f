"""The Hub source, with no network: huggingface_hub's real code against a real cache layout and a local fake Hub.

The cache is built by hand exactly as huggingface_hub lays it out (``models--owner--name/{blobs,refs,snapshots}``,
snapshot files linking to blobs named by their sha256), so ``hf_hub_download`` itself resolves the files. HTTP
failures come from a tiny server on 127.0.0.1 answering with the headers the Hub sends (``X-Error-Code``,
``X-Repo-Commit``), so the library raises its own exceptions and the tests check the lines they become.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from huggingface_hub import constants

from harness import config
from harness.config import ModelSpec
from harness.sources import base, hub, quantize, resolve

HUB_REPO = "bartowski/Llama-3.2-1B-Instruct-GGUF"
PATTERN = "Llama-3.2-1B-Instruct-{quant}.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SPEC = ModelSpec(source="hub", architecture="", repo=HUB_REPO, file=PATTERN)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A real (tiny) quantized GGUF to put in the cache; the same bytes serve under every quant's name."""
    cache = tmp_path_factory.getbasetemp() / "tiny-few-quants"
    return quantize.ensure_synthetic(cache, "tiny", 0, "Q4_K_M", imatrix=True)[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME of our own; huggingface_hub read its settings at import, so set its constants too."""
    home = tmp_path / "hf"
    cache = home / "hub"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "_probe_cache", {})
    return cache


@pytest.fixture
def offline(hf_cache, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_cache


def put_in_cache(cache: Path, src: Path, file: str, *, repo: str = HUB_REPO, commit: str = COMMIT,
                 blob_name: str | None = None) -> Path:
    """Lay `src` out as huggingface_hub does after downloading `file` of `repo` at `commit` (branch main)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    blob = folder / "blobs" / (blob_name or sha256(src))
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, blob)
    link = folder / "snapshots" / commit / file
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return link


# --- the cache, offline -------------------------------------------------------------------------------------


def test_cached_file_resolves_offline_with_commit_and_sha256(offline, tiny_gguf):
    file = PATTERN.format(quant="Q4_K_M")
    link = put_in_cache(offline, tiny_gguf, file)
    mf = hub.fetch(SPEC, "Q4_K_M")
    assert mf.path == link and mf.path.read_bytes() == tiny_gguf.read_bytes()
    assert (mf.quant, mf.weights) == ("Q4_K_M", "hub")
    assert mf.weights_ref == f"{HUB_REPO}@{COMMIT}:{file}"
    assert mf.sha256 == sha256(tiny_gguf)
    # pinned to the commit: the same file, without reading refs/main
    pinned = ModelSpec(source="hub", architecture="", repo=HUB_REPO, file=PATTERN, revision=COMMIT)
    assert hub.fetch(pinned, "Q4_K_M") == mf
    # through the config, as the runner calls it
    cfg = config.from_dict({"name": "t", "model": {"source": "hub", "repo": HUB_REPO, "file": PATTERN},
                            "quants": ["Q4_K_M"]})
    assert resolve.resolve(cfg, "Q4_K_M") == mf


def test_cache_stays_healthy_for_huggingface_hub(offline, tiny_gguf):
    """Nothing is written into the Hub cache (hashes are remembered in the harness's own cache): `hf cache` tools
    see one clean file."""
    from huggingface_hub import scan_cache_dir

    put_in_cache(offline, tiny_gguf, PATTERN.format(quant="Q4_K_M"))
    hub.fetch(SPEC, "Q4_K_M")
    info = scan_cache_dir(offline)
    assert not info.warnings
    (repo,) = info.repos
    (rev,) = repo.revisions
    assert rev.commit_hash == COMMIT and [f.file_name for f in rev.files] == [PATTERN.format(quant="Q4_K_M")]


def test_checksum_mismatch_is_refused(offline, tiny_gguf):
    wrong = hashlib.sha256(b"some other file").hexdigest()
    put_in_cache(offline, tiny_gguf, PATTERN.format(quant="Q8_0"), blob_name=wrong)
    with pytest.raises(base.SourceError) as e:
        hub.fetch(SPEC, "Q8_0")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("Q8_0: ") and "corrupt" in msg
    assert wrong[:16] in msg and sha256(tiny_gguf)[:16] in msg and "delete" in msg


def test_offline_and_not_cached_says_the_way_out(offline):
    with pytest.raises(base.SourceError) as e:
        hub.fetch(SPEC, "Q4_K_M")
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("Q4_K_M: ", PATTERN.format(quant="Q4_K_M"), HUB_REPO, "revision main", "HF_HUB_OFFLINE",
                 f"hf download {HUB_REPO} {PATTERN.format(quant='Q4_K_M')}", "source: local",
                 "configs/1b-synthetic.yaml"):
        assert part in msg


def test_preflight_offline_names_each_missing_quant(offline, tiny_gguf):
    qs = ["IQ3_M", "Q4_K_M", "Q8_0"]
    lines = hub.preflight(SPEC, qs)
    assert [x.split(":")[0] for x in lines] == qs
    assert all("not in the Hugging Face cache" in x and "HF_HUB_OFFLINE" in x for x in lines)
    put_in_cache(offline, tiny_gguf, PATTERN.format(quant="Q4_K_M"))
    assert [x.split(":")[0] for x in hub.preflight(SPEC, qs)] == ["IQ3_M", "Q8_0"]
    assert not list(offline.rglob("*.incomplete"))


def test_preflight_when_the_hub_never_answers(hf_cache, monkeypatch):
    """A network that drops packets: the probe gives up at its deadline, and preflight reports as offline."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nothing ever answers
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 1.0)
    try:
        t0 = time.monotonic()
        lines = hub.preflight(SPEC, ["Q4_K_M", "Q8_0"])
        assert time.monotonic() - t0 < 5
    finally:
        silent.close()
    assert len(lines) == 2 and all("cannot be reached (no answer within 1 s)" in x for x in lines)


def test_fetch_when_the_hub_refuses_connections_uses_the_cache_at_once(hf_cache, tiny_gguf, monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connection refused
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        f"http://127.0.0.1:{port}" + "/{repo_id}/resolve/{revision}/{filename}")
    put_in_cache(hf_cache, tiny_gguf, PATTERN.format(quant="Q4_K_M"))
    assert hub.fetch(SPEC, "Q4_K_M").weights_ref == f"{HUB_REPO}@{COMMIT}:{PATTERN.format(quant='Q4_K_M')}"
    (line,) = hub.preflight(SPEC, ["Q4_K_M", "Q8_0"])
    assert line.startswith("Q8_0: ") and "cannot be reached (ConnectError" in line
    with pytest.raises(base.SourceError, match=r"^Q8_0: .*cannot be reached.*hf download"):
        hub.fetch(SPEC, "Q8_0")


# --- a fake Hub on 127.0.0.1 ----------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self, with_body: bool) -> None:
        path = self.path.split("?")[0]
        self.server.requests.append((self.command, path))
        # Unknown paths: what the Hub says for a repo that does not exist (or that you may not see)
        status, headers, body = (200, {}, b"") if path == "/" else self.server.routes.get(
            path, (401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self._answer(False)

    def do_GET(self):  # noqa: N802
        self._answer(True)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(hf_cache, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.routes = {}
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    yield server
    server.shutdown()
    server.server_close()


def resolve_path(file: str, revision: str = "main", repo: str = HUB_REPO) -> str:
    return f"/{repo}/resolve/{revision}/{file}"


def serve_file(server, file: str, data: bytes, etag: str) -> None:
    server.routes[resolve_path(file)] = (200, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}, data)


def test_downloads_through_the_library_and_verifies(fake_hub, hf_cache, tiny_gguf):
    file = PATTERN.format(quant="Q4_K_M")
    data = tiny_gguf.read_bytes()
    serve_file(fake_hub, file, data, sha256(tiny_gguf))
    assert hub.preflight(SPEC, ["Q4_K_M"]) == []  # online: nothing to say, and nothing fetched
    assert ("GET", resolve_path(file)) not in fake_hub.requests
    mf = hub.fetch(SPEC, "Q4_K_M")
    assert ("GET", resolve_path(file)) in fake_hub.requests
    assert mf.path == hf_cache / f"models--{HUB_REPO.replace('/', '--')}" / "snapshots" / COMMIT / file
    assert mf.path.read_bytes() == data and mf.sha256 == sha256(tiny_gguf)
    assert mf.weights_ref == f"{HUB_REPO}@{COMMIT}:{file}"


def test_cache_without_symlinks_is_checked_against_the_hubs_metadata(fake_hub, hf_cache, tiny_gguf):
    """Where the cache holds copies, not links (no symlinks on the file system), the Hub's etag is asked for."""
    file = PATTERN.format(quant="Q4_K_M")
    link = put_in_cache(hf_cache, tiny_gguf, file)
    link.unlink()
    shutil.copyfile(tiny_gguf, link)
    for rev in ("main", COMMIT):
        fake_hub.routes[resolve_path(file, rev)] = (
            200, {"X-Repo-Commit": COMMIT, "ETag": f'"{sha256(tiny_gguf)}"'}, tiny_gguf.read_bytes())
    assert hub.fetch(SPEC, "Q4_K_M").sha256 == sha256(tiny_gguf)
    assert ("HEAD", resolve_path(file, COMMIT)) in fake_hub.requests
    link.write_bytes(tiny_gguf.read_bytes()[:-1] + b"x")  # a damaged copy
    with pytest.raises(base.SourceError, match="is corrupt"):
        hub.fetch(SPEC, "Q4_K_M")


def test_download_with_a_wrong_etag_is_refused(fake_hub, tiny_gguf):
    file = PATTERN.format(quant="Q8_0")
    serve_file(fake_hub, file, tiny_gguf.read_bytes(), hashlib.sha256(b"the Hub's real file").hexdigest())
    with pytest.raises(base.SourceError, match=r"^Q8_0: .* is corrupt: its sha256 is"):
        hub.fetch(SPEC, "Q8_0")


def test_missing_file_names_file_and_repo(fake_hub, monkeypatch):
    file = PATTERN.format(quant="Q4_K_M")
    fake_hub.routes[resolve_path(file)] = (404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT,
                                                 "X-Error-Message": "Entry not found"}, b"")
    with pytest.raises(base.SourceError) as e:
        hub.fetch(SPEC, "Q4_K_M")
    msg = str(e.value)
    assert "\n" not in msg and f"file {file!r} not found in {HUB_REPO}" in msg and "model.file" in msg
    # the library remembered the 404: offline later, preflight says the file does not exist (not "download it")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (line,) = hub.preflight(SPEC, ["Q4_K_M"])
    assert "does not exist" in line


def test_gated_repo_says_accept_license_and_set_token(fake_hub):
    repo = "meta-llama/Llama-3.2-1B"
    spec = ModelSpec(source="hub", architecture="", repo=repo, file="model-{quant}.gguf")
    fake_hub.routes[resolve_path("model-Q4_K_M.gguf", repo=repo)] = (
        401, {"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to model {repo} is restricted."}, b"")
    with pytest.raises(base.SourceError) as e:
        hub.fetch(spec, "Q4_K_M")
    msg = str(e.value)
    assert "\n" not in msg and "gated" in msg and "accept its license" in msg and "HF_TOKEN" in msg and repo in msg


def test_unknown_or_private_repo(fake_hub):
    spec = ModelSpec(source="hub", architecture="", repo="nobody/nothing", file="m-{quant}.gguf")
    with pytest.raises(base.SourceError) as e:
        hub.fetch(spec, "Q4_K_M")
    msg = str(e.value)
    assert "\n" not in msg and "repository nobody/nothing not found" in msg and "HF_TOKEN" in msg


def test_unknown_revision(fake_hub):
    spec = ModelSpec(source="hub", architecture="", repo=HUB_REPO, file=PATTERN, revision="v9")
    fake_hub.routes[resolve_path(PATTERN.format(quant="Q4_K_M"), "v9")] = (
        404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id: v9"}, b"")
    with pytest.raises(base.SourceError, match=r"^Q4_K_M: revision 'v9' not found in .*model.revision"):
        hub.fetch(spec, "Q4_K_M")


def test_disk_full_while_downloading(fake_hub, tiny_gguf, monkeypatch):
    from huggingface_hub import file_download

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_download, "http_get", full)
    serve_file(fake_hub, PATTERN.format(quant="Q4_K_M"), tiny_gguf.read_bytes(), sha256(tiny_gguf))
    with pytest.raises(base.SourceError, match=r"^Q4_K_M: disk full while downloading .*HF_HOME"):
        hub.fetch(SPEC, "Q4_K_M")


def test_hub_down_and_not_cached(fake_hub, monkeypatch):
    fake_hub.routes[resolve_path(PATTERN.format(quant="Q4_K_M"))] = (500, {}, b"")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    from huggingface_hub import file_download

    monkeypatch.setattr(file_download, "_ETAG_RETRY_TIMEOUT", 1)
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)  # the library's backoff
    with pytest.raises(base.SourceError) as e:
        hub.fetch(SPEC, "Q4_K_M")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("Q4_K_M: ") and "HTTP 500" in msg and "hf download" in msg


# --- the command line ------------------------------------------------------------------------------------------


def test_run_offline_with_empty_cache_fails_fast_and_creates_nothing(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HF_TOKEN", "HF_ENDPOINT", "HARNESS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "results" / "run"
    t0 = time.monotonic()
    r = run_cli("run", "configs/1b.yaml", "--out", str(out), "--no-progress",
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=60)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    cfg = config.load(REPO / "configs" / "1b.yaml")
    assert len(lines) == len(cfg.quants) == 12
    assert lines[0].startswith("error: IQ3_M: ")
    for line, q in zip(lines, cfg.quants):
        assert q in line and PATTERN.format(quant=q) in line and "not in the Hugging Face cache" in line
    assert not out.exists()
    assert not (tmp_path / "hf" / "hub").exists() or not list((tmp_path / "hf" / "hub").rglob("*.gguf"))


def test_headline_config():
    cfg = config.load(REPO / "configs" / "1b.yaml")
    assert cfg.model.source == "hub" and cfg.model.repo == HUB_REPO and cfg.model.file == PATTERN
    assert cfg.model.revision is None
    assert cfg.quants == config.quants.PAGE_QUANTS
    assert cfg.bench == config.load(REPO / "configs" / "1b-synthetic.yaml").bench
