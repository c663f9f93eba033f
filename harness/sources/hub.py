"""Hub source: the real GGUF files from the Hugging Face Hub, through huggingface_hub's own cache.

``hf_hub_download`` does the transfer (HF_HOME / HF_HUB_CACHE, HF_TOKEN for gated repos, its progress bars,
HF_HUB_OFFLINE). This module adds what a measurement needs on top of it:

- the commit actually used, recorded as ``weights_ref = "repo@<commit>:<file>"`` (a branch moves; a commit
  does not);
- a check of the bytes against the Hub's LFS metadata: in the cache, ``snapshots/<commit>/<file>`` links to
  ``blobs/<etag>``, and an LFS file's etag IS its sha256, so a truncated or corrupted file is refused before it
  is measured;
- one clear line (a :class:`~harness.sources.base.SourceError`) for every way getting the file can fail, with the
  way out;
- :func:`preflight`, which the runner calls before it creates a results folder: offline, every quant whose
  file is not already cached is named at once, instead of twelve failures one by one.

An interrupted download starts over: huggingface_hub (since 1.31) writes each download to a fresh temporary
file and deletes it on failure (huggingface/huggingface_hub#4196); only files completed earlier are reused.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path

from harness.config import ModelSpec
from harness.sources import base as sources

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 4.0  # how long the reachability probe waits for the Hub to answer anything
PROBE_TTL_S = 60.0  # how long a probe's answer is reused (a sweep asks once per quant)
SYNTHETIC_CONFIG = "configs/1b-synthetic.yaml"  # the run that needs no network

_SHA256_RE = re.compile(r"[0-9a-f]{64}")  # etag of an LFS file: the sha256 of its bytes
_GIT_SHA1_RE = re.compile(r"[0-9a-f]{40}")  # etag of a plain git file: its git blob sha1

_probe_lock = threading.Lock()
_probe_cache: dict[str, tuple[float, str | None]] = {}  # endpoint -> (monotonic time, why unreachable)


def _constants():
    # Read at call time, not import time: tests (and users of the Python API) set them after import.
    from huggingface_hub import constants

    return constants


def revision_of(spec: ModelSpec) -> str:
    return spec.revision or "main"


def file_of(spec: ModelSpec, quant: str) -> str:
    assert spec.file is not None, "config validation requires model.file for source 'hub'"
    return spec.file.format(quant=quant)


def _tried(spec: ModelSpec, file: str) -> str:
    return f"{file} from {spec.repo} (revision {revision_of(spec)})"


def _way_out(spec: ModelSpec, file: str) -> str:
    rev = f" --revision {spec.revision}" if spec.revision else ""
    return (f"pre-download it (hf download {spec.repo} {file}{rev}), point a 'source: local' config at the "
            f"file, or run {SYNTHETIC_CONFIG} (no network needed)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    return line or type(e).__name__


def _probe(endpoint: str, timeout_s: float) -> str | None:
    """None when the Hub answers anything at all within `timeout_s`, else what went wrong.

    The request runs in a daemon thread that is abandoned at the deadline: a name lookup through a resolver
    that silently drops packets can block far longer than any socket timeout, and must not hold up the run.
    """
    from huggingface_hub.utils import get_session

    answer: list[str | None] = []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=timeout_s)  # any HTTP status means the Hub is there
            answer.append(None)
        except Exception as e:  # noqa: BLE001 - every failure means the same here: not reachable
            timed_out = "Timeout" in type(e).__name__  # httpx's ConnectTimeout, ReadTimeout, ...
            answer.append(f"no answer within {timeout_s:g} s" if timed_out else f"{type(e).__name__}: {_first_line(e)}")

    t = threading.Thread(target=probe, name="hub-probe", daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    return answer[0] if answer else f"no answer within {timeout_s:g} s"


def offline_reason() -> str | None:
    """Why the Hub cannot be used now ("HF_HUB_OFFLINE is set", "... cannot be reached"), or None when it can."""
    c = _constants()
    # The library reads HF_HUB_OFFLINE once, at import; the environment may have been set since.
    if c.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    endpoint = c.ENDPOINT
    with _probe_lock:
        now = time.monotonic()
        hit = _probe_cache.get(endpoint)
        if hit is None or now - hit[0] > PROBE_TTL_S:
            hit = (now, _probe(endpoint, PROBE_TIMEOUT_S))
            _probe_cache[endpoint] = hit
            if hit[1]:
                log.info("the Hub (%s) cannot be reached: %s", endpoint, hit[1])
    return None if hit[1] is None else f"the Hub ({endpoint}) cannot be reached ({hit[1]})"


def _not_cached_line(spec: ModelSpec, quant: str, file: str, why: str) -> str:
    return (f"{quant}: {_tried(spec, file)} is not in the Hugging Face cache ({_constants().HF_HUB_CACHE}) "
            f"and {why}: {_way_out(spec, file)}")


def preflight(spec: ModelSpec, quants: list[str]) -> list[str]:
    """One line per quant that cannot be had, offline; [] when the Hub is reachable or everything is cached.

    Downloads nothing and takes at most a few seconds (one short probe of the Hub, then the cache on disk).
    """
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

    why = offline_reason()
    if why is None:
        return []
    problems = []
    for quant in quants:
        file = file_of(spec, quant)
        cached = try_to_load_from_cache(spec.repo, file, revision=revision_of(spec))
        if isinstance(cached, str):
            continue
        if cached is _CACHED_NO_EXIST:
            problems.append(f"{quant}: {file} does not exist in {spec.repo} at revision {revision_of(spec)} "
                            f"(the Hub said so on an earlier try): check model.file {spec.file!r}")
        else:
            problems.append(_not_cached_line(spec, quant, file, why))
    return problems


def _explain(e: Exception, spec: ModelSpec, quant: str, file: str, why_offline: str | None) -> sources.SourceError:
    """The one line for an exception of huggingface_hub (the order matters: the classes inherit each other)."""
    from huggingface_hub import errors as hf

    c = _constants()
    repo, rev = spec.repo, revision_of(spec)
    if isinstance(e, hf.GatedRepoError):
        msg = (f"{repo} is a gated repo: accept its license at {c.ENDPOINT}/{repo} while logged in, then set "
               f"HF_TOKEN to a token of that account (or run hf auth login)")
    elif isinstance(e, hf.RepositoryNotFoundError):
        msg = (f"repository {repo} not found on {c.ENDPOINT} (or it is private or gated and HF_TOKEN is not set "
               f"or has no access): check model.repo, or accept the license on the Hub and set HF_TOKEN")
    elif isinstance(e, hf.RevisionNotFoundError):
        msg = f"revision {rev!r} not found in {repo}: check model.revision (a branch, a tag or a full commit hash)"
    elif isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        cause = e.__cause__
        if why_offline:
            why = why_offline
        elif isinstance(cause, hf.HfHubHTTPError) and cause.response is not None:
            why = f"the Hub answered HTTP {cause.response.status_code} (down or overloaded; try again later)"
        else:
            why = f"the Hub could not be reached ({_first_line(cause or e)})"
        return sources.SourceError(_not_cached_line(spec, quant, file, why))
    elif isinstance(e, hf.EntryNotFoundError):  # remote: the repo and revision exist, the file does not
        msg = (f"file {file!r} not found in {repo} at revision {rev}: check model.file {spec.file!r} against "
               f"{c.ENDPOINT}/{repo}/tree/{rev}")
    elif isinstance(e, hf.HfHubHTTPError) and e.response is not None and e.response.status_code in (401, 403):
        msg = (f"the Hub refused {file} from {repo} (HTTP {e.response.status_code}): if the repo is gated, accept "
               f"its license on the Hub and set HF_TOKEN to a token with access")
    elif isinstance(e, hf.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        msg = f"the Hub answered HTTP {status} for {_tried(spec, file)}: {_first_line(e)}; try again later"
    elif (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
        msg = (f"disk full while downloading {file} into {c.HF_HUB_CACHE}: free space, or set HF_HOME (or "
               f"HF_HUB_CACHE) to a bigger disk")
    elif isinstance(e, PermissionError):
        msg = f"cannot write the Hugging Face cache {c.HF_HUB_CACHE}: {e.strerror}; set HF_HOME to a writable folder"
    else:
        msg = f"downloading {_tried(spec, file)} failed: {type(e).__name__}: {_first_line(e)}"
    return sources.SourceError(f"{quant}: {msg}")


def _snapshot_commit(path: Path, file: str) -> str | None:
    """The commit folder of `path` = <cache>/<repo folder>/snapshots/<commit>/<file>, or None if not laid out so."""
    commit_dir = path.parents[len(file.split("/")) - 1]
    return commit_dir.name if commit_dir.parent.name == "snapshots" else None


def _blob_of(path: Path) -> Path | None:
    """The repo's blobs/<etag> entry that the snapshot link points at, or None when the file is no link.

    One hop only: blobs/<etag> may itself link on into the cache-wide shared store, whose names are Xet hashes,
    not sha256.
    """
    if not path.is_symlink():
        return None
    target = Path(os.path.normpath(path.parent / os.readlink(path)))
    return target if target.parent.name == "blobs" else None


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def _remote_etag(spec: ModelSpec, file: str, commit: str) -> str | None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        return get_hf_file_metadata(hf_hub_url(spec.repo, file, revision=commit)).etag
    except Exception as e:  # noqa: BLE001 - no metadata means unverifiable, said by the caller
        log.debug("no metadata for %s@%s:%s: %s", spec.repo, commit, file, e)
        return None


def verify(spec: ModelSpec, quant: str, file: str, path: Path, commit: str, online: bool) -> str:
    """sha256 of `path`, checked against the Hub's etag for it; raises SourceError on a mismatch."""
    blob = _blob_of(path)
    expected = blob.name if blob is not None else None
    if expected is None and online:  # a cache without symlinks: ask the Hub
        expected = _remote_etag(spec, file, commit)
    hash_path = blob if blob is not None else path  # hashed once per blob (remembered in the harness's cache)
    digest = sources.sha256_file(hash_path)
    where = f"{file} from {spec.repo}@{commit}"
    if expected is not None and _SHA256_RE.fullmatch(expected):
        if digest != expected:
            raise sources.SourceError(
                f"{quant}: {where} is corrupt: its sha256 is {digest[:16]}... but the Hub's LFS metadata says "
                f"{expected[:16]}...; delete {blob or path} and run again to download it afresh")
    elif expected is not None and _GIT_SHA1_RE.fullmatch(expected):  # a small file kept in git, not LFS
        actual = _git_blob_sha1(hash_path)
        if actual != expected:
            raise sources.SourceError(
                f"{quant}: {where} is corrupt: its git blob sha1 is {actual[:16]}... but the Hub says "
                f"{expected[:16]}...; delete {blob or path} and run again to download it afresh")
    else:
        log.warning("%s: cannot verify %s: the cache keeps no etag for it (a cache without symlinks) and the Hub "
                    "gave none; measuring it unverified (sha256 %s)", quant, where, digest)
    return digest


def fetch(spec: ModelSpec, quant: str, progress: bool = False) -> sources.ModelFile:
    """The `quant` file of a ``source: hub`` config, from the cache or downloaded into it, and verified."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils.tqdm import silent_tqdm

    file = file_of(spec, quant)
    why_offline = offline_reason()
    try:
        # Known offline: look in the cache only, at once, instead of the library's retries with backoff.
        local = hf_hub_download(spec.repo, file, revision=spec.revision, local_files_only=why_offline is not None,
                                tqdm_class=None if progress else silent_tqdm)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line; KeyboardInterrupt passes
        log.debug("hf_hub_download(%s, %s, revision=%s) failed", spec.repo, file, spec.revision, exc_info=e)
        raise _explain(e, spec, quant, file, why_offline) from None
    path = Path(local)
    commit = _snapshot_commit(path, file) or spec.revision or "unknown"
    digest = verify(spec, quant, file, path, commit, online=why_offline is None)
    return sources.ModelFile(quant, path, "hub", f"{spec.repo}@{commit}:{file}", digest)
