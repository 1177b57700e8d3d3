"""The SuperLink working-folder trap: relative run-config paths are logged with the folder they resolved in."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import ServerSettings, describe_paths, relative_paths


def test_relative_run_config_paths_are_named_with_the_folder_they_resolved_against(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the SuperLink's working folder, not the checkout's
    run_config = {"data-root": "demo_out/data", "out-dir": str(tmp_path / "abs_run")}

    settings = ServerSettings.from_run_config(run_config)
    lines = describe_paths(settings, relative_paths(run_config))

    assert settings.data_root == tmp_path / "demo_out" / "data"
    assert f"run config data-root = {tmp_path / 'demo_out' / 'data'}" in lines
    assert relative_paths(run_config) == {"data-root": "demo_out/data"}
    assert str(tmp_path) in lines[-1] and "absolute" in lines[-1] and "out-dir=" in lines[-1]


def test_absolute_run_config_paths_log_no_warning(tmp_path: Path) -> None:
    run_config = {"data-root": str(tmp_path / "data"), "out-dir": str(tmp_path / "run")}

    assert relative_paths(run_config) == {}
    assert not any("relative" in line for line in describe_paths(ServerSettings.from_run_config(run_config), {}))
