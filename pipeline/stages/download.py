"""The download stage: the official files (MD5-checked, retried), a local folder in the official format, or
the synthetic stand-in, into ``paths.raw`` with a manifest; official files are cached outside DVC's outputs."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import DownloadSettings, Settings
from pipeline.contract import DataError, official_file_names
from pipeline.data import (
    MANIFEST_NAME,
    OFFICIAL_CLASSMAP_MD5,
    OFFICIAL_FILES,
    load_official,
    local_prefix,
    md5_of,
)
from pipeline.files import TEMP_SUFFIX, atomic_path, remove_stale_parts, write_json

logger = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "http://codh.rois.ac.jp/kmnist/dataset/{dataset}/"


# Retrying these HTTP statuses may help (server busy or failing); other errors will not change.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
NO_DOWNLOAD_HINT = (
    "What to do: check the network, point data.base_url at a mirror holding the official files, or set "
    "data.dataset=local with data.local_dir holding the files you already have"
)


def _copy_file(source: Path, target: Path) -> Path:
    with atomic_path(target) as temp:
        shutil.copyfile(source, temp)
    return target


def _link_or_copy(source: Path, target: Path) -> Path:
    """Hard-link ``source`` to ``target`` (atomic rename over it); copy where links are impossible.

    Only for files that are replaced, never written in place (the download cache): a shared inode is safe.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(target.parent, target.name)
    temp = target.parent / f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        os.link(source, temp)  # another filesystem, or one without hard links: OSError
    except OSError as exc:
        logger.info("%s: cannot hard-link into %s (%s); copying", source, target.parent, exc)
        return _copy_file(source, target)
    try:
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


class _Retryable(Exception):
    """A failed attempt that may succeed when tried again (network error, busy server, cut-off body)."""


def download_files(
    base_url: str,
    dest_dir: Path,
    expected: Mapping[str, str],
    options: DownloadSettings,
    sizes: Mapping[str, int] | None = None,
) -> list[Path]:
    """Download ``base_url/<name>`` for each name of ``expected`` (name -> MD5) into ``dest_dir``.

    A file already there with the right MD5 is kept. Each file is streamed to a temporary file, its
    size (Content-Length and ``sizes``, when known) and MD5 checked, then renamed into place; network
    errors, retryable HTTP statuses and truncated bodies are retried ``options.retries`` times with
    exponential backoff. Raises :class:`DataError` naming the file and URL.
    """
    import httpx

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    sizes = sizes or {}
    paths = []
    with httpx.Client(
        timeout=httpx.Timeout(options.timeout_s),
        follow_redirects=True,
        headers={"Accept-Encoding": "identity"},  # byte counts then match Content-Length
    ) as client:
        for name, md5 in expected.items():
            target = dest_dir / name
            remove_stale_parts(dest_dir, name)  # left by a killed run; never accepted, never reused
            if target.is_file():
                if md5_of(target) == md5.lower():
                    logger.info("%s: already present with the expected MD5, not downloaded again", target)
                    paths.append(target)
                    continue
                logger.warning("%s: present but its MD5 differs; downloading it again", target)
            url = f"{base_url.rstrip('/')}/{name}"
            paths.append(_download_one(client, url, target, md5.lower(), sizes.get(name), options))
    return paths


def _download_one(
    client: Any, url: str, target: Path, md5: str, size: int | None, options: DownloadSettings
) -> Path:
    attempts = options.retries + 1
    for attempt in range(attempts):
        try:
            with atomic_path(target) as temp:
                received, digest = _stream(client, url, temp, size)
                if digest != md5:
                    raise DataError(
                        f"{target.name} downloaded from {url} has MD5 {digest} ({received} bytes), expected "
                        f"{md5}: the server holds a different or damaged file; nothing was kept. "
                        + NO_DOWNLOAD_HINT
                    )
            logger.info("%s: downloaded from %s (%d bytes, MD5 ok)", target, url, received)
            return target
        except _Retryable as exc:
            if attempt + 1 >= attempts:
                raise DataError(
                    f"could not download {target.name} from {url} after {attempts} attempt(s): {exc}. "
                    + NO_DOWNLOAD_HINT
                ) from None
            delay = options.backoff_s * 2**attempt
            logger.warning("%s: %s; retry %d/%d in %.1fs", url, exc, attempt + 1, options.retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def _stream(client: Any, url: str, temp: Path, size: int | None) -> tuple[int, str]:
    """GET ``url`` into ``temp``; return (bytes received, MD5). Raises _Retryable or DataError."""
    import httpx
    from tqdm import tqdm

    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    try:
        with client.stream("GET", url) as response:
            status = response.status_code
            if status in RETRYABLE_STATUS:
                raise _Retryable(f"HTTP {status}")
            if status != httpx.codes.OK:
                raise DataError(
                    f"could not download {Path(url).name} from {url}: "
                    f"HTTP {status} {response.reason_phrase}. " + NO_DOWNLOAD_HINT
                )
            declared = _content_length(response)
            if declared is not None and size is not None and declared != size:
                raise DataError(  # checked before the body: no need to fetch a file we would reject
                    f"{Path(url).name} at {url} has {declared} bytes (Content-Length), expected {size}: the "
                    "server holds a different file; nothing was kept. " + NO_DOWNLOAD_HINT
                )
            with (
                open(temp, "wb") as out,
                tqdm(
                    total=declared if declared is not None else size,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=Path(url).name,
                    leave=False,
                    disable=None,  # a bar on terminals, quiet in logs
                ) as bar,
            ):
                for chunk in response.iter_bytes():  # as the network delivers it (decoded if encoded)
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except httpx.RemoteProtocolError as exc:  # h11 noticed the body ended before Content-Length
        raise _Retryable(f"truncated body: connection closed after {received} bytes ({exc})") from None
    except httpx.TransportError as exc:  # refused, DNS, timeouts, connection reset
        raise _Retryable(f"{type(exc).__name__}: {exc or 'no details'} ({received} bytes received)") from None
    if declared is not None and received < declared:
        raise _Retryable(f"truncated body: {received} of {declared} bytes (Content-Length)")
    if size is not None and declared is None and received < size:
        raise _Retryable(f"truncated body: {received} of the expected {size} bytes")
    if (declared is not None and received != declared) or (size is not None and received != size):
        raise DataError(
            f"{Path(url).name} from {url} has {received} bytes, expected {size if size else declared}: "
            "the server holds a different file; nothing was kept. " + NO_DOWNLOAD_HINT
        )
    return received, digest.hexdigest()


def _content_length(response: Any) -> int | None:
    value = response.headers.get("Content-Length")
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if value is None or not value.isdigit() or encoding != "identity":
        return None
    return int(value)


def run(settings: Settings) -> Path:
    """The download stage: official download, local copy or synthetic generation into ``paths.raw``."""
    cfg = settings.data
    raw = settings.path("raw")
    raw.mkdir(parents=True, exist_ok=True)
    # The manifest marks a complete stage: it is dropped before any raw file changes, so a failed run
    # never looks complete, and written last.
    manifest_path = raw / MANIFEST_NAME
    if cfg.dataset in OFFICIAL_FILES:
        manifest_path.unlink(missing_ok=True)
        prefix: str = cfg.dataset
        base_url = cfg.base_url or OFFICIAL_BASE_URL.format(dataset=prefix)
        facts = OFFICIAL_FILES[prefix]
        # The cache outlives paths.raw (which DVC deletes before each run of this stage); it is keyed by
        # the official MD5s, so the official site and any mirror share it.
        cached = download_files(
            base_url,
            settings.path("downloads") / prefix,
            {name: fact.md5 for name, fact in facts.items()},
            cfg.download,
            sizes={name: fact.bytes for name, fact in facts.items()},
        )
        for path in cached:
            _link_or_copy(path, raw / path.name)
        source = base_url
    elif cfg.dataset == "local":
        assert cfg.local_dir is not None  # guaranteed by DataSettings
        folder = cfg.local_dir if cfg.local_dir.is_absolute() else settings.root / cfg.local_dir
        prefix = local_prefix(folder, cfg.local_prefix)
        load_official(folder, prefix)  # validate everything before touching paths.raw
        incoming: dict[str, str | None] = {name: md5_of(folder / name)
                                           for name in official_file_names(prefix).values()}
        _keep_official_downloads(raw, incoming, f"the files of {folder}")
        manifest_path.unlink(missing_ok=True)
        for name in official_file_names(prefix).values():
            if (raw / name).resolve() != (folder / name).resolve():
                _copy_file(folder / name, raw / name)
        source = str(folder.resolve())
    else:
        from pipeline import synthetic

        prefix = synthetic.PREFIX
        options = cfg.synthetic
        # The synthetic class map is the official one; every other file differs from a real download.
        incoming = dict.fromkeys(official_file_names(prefix).values())
        incoming[official_file_names(prefix)["classmap"]] = OFFICIAL_CLASSMAP_MD5[prefix]
        _keep_official_downloads(raw, incoming, "the synthetic set")
        manifest_path.unlink(missing_ok=True)
        synthetic.generate(raw, options.train_per_class, options.test_per_class, options.seed)
        source = f"synthetic:seed={options.seed}"
    loaded = load_official(raw, prefix)  # the same validator for every source
    names = official_file_names(prefix).values()
    manifest = {
        "dataset": cfg.dataset,
        "source": source,
        "prefix": prefix,
        "files": {name: {"md5": md5_of(raw / name), "bytes": (raw / name).stat().st_size} for name in names},
        "n_train": len(loaded.train),
        "n_test": len(loaded.test),
        "n_classes": len(loaded.classmap),
    }
    write_json(manifest_path, manifest)
    logger.info("raw data ready in %s: %s", raw, {k: v for k, v in manifest.items() if k != "files"})
    return raw


def _keep_official_downloads(raw: Path, incoming: Mapping[str, str | None], what: str) -> None:
    """Refuse to overwrite a verified official file in ``raw`` with different content (MD5 ``incoming``)."""
    official = {fact.md5 for facts in OFFICIAL_FILES.values() for fact in facts.values()}
    clashes = [
        name
        for name, md5 in incoming.items()
        if (raw / name).is_file() and (current := md5_of(raw / name)) in official and current != md5
    ]
    if clashes:
        raise DataError(
            f"{raw} holds official downloaded files ({', '.join(clashes)}) that {what} would overwrite; "
            "nothing was changed. Move them away, or point paths.raw at another folder"
        )

