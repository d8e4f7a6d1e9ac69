"""eksft_pipeline.verl_ext refuses a verl version its patches were not read from, naming what to re-check."""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings

import pytest

import eksft_pipeline.verl_ext as verl_ext


def test_installed_verl_is_the_version_the_patches_were_read_from():
    assert verl_ext.installed_verl_version() == verl_ext.VERL_VERSION == "0.9.1"


def test_another_verl_version_raises_naming_the_file_to_recheck(monkeypatch):
    monkeypatch.delenv(verl_ext.ALLOW_ENV, raising=False)
    with pytest.raises(verl_ext.VerlVersionError) as e:
        verl_ext.check_verl_version("0.10.0")
    msg = str(e.value)
    assert "verl 0.10.0 is installed" in msg and "verl 0.9.1" in msg
    assert "eksft_pipeline/verl_ext/__init__.py" in msg and "EKSFT_ALLOW_VERL_VERSION=1" in msg


def test_reimporting_the_package_with_another_verl_fails_and_the_override_warns(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.0" if name == "verl" else real(name))
    monkeypatch.delenv(verl_ext.ALLOW_ENV, raising=False)
    try:
        # reload re-creates the classes: match by name and message
        with pytest.raises(ImportError, match="re-check every API") as e:
            importlib.reload(verl_ext)
        assert type(e.value).__name__ == "VerlVersionError"
        monkeypatch.setenv(verl_ext.ALLOW_ENV, "1")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            importlib.reload(verl_ext)
        assert [x.category.__name__ for x in w if "verl 0.10.0" in str(x.message)] == ["VerlVersionWarning"]
    finally:
        monkeypatch.setattr(importlib.metadata, "version", real)
        importlib.reload(verl_ext)


def test_local_version_suffix_passes_and_missing_verl_is_left_to_verl(monkeypatch):
    monkeypatch.delenv(verl_ext.ALLOW_ENV, raising=False)
    assert verl_ext.check_verl_version("0.9.1+cpu") == "0.9.1+cpu"
    monkeypatch.setattr(verl_ext, "installed_verl_version", lambda: None)
    assert verl_ext.check_verl_version() is None
