"""The README says nothing is contacted: DVC's own reader of this checkout's config finds its update check and
analytics off."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dvc_neither_checks_for_updates_nor_reports_analytics(monkeypatch) -> None:
    from dvc.updater import Updater

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("CI", raising=False)  # CI alone would also skip the check; the config must
    updater = Updater(str(REPO / ".dvc" / "tmp"))
    assert updater.is_enabled() is False
    from dvc.config import Config

    assert Config.from_cwd(validate=False)["core"].get("analytics") in (False, "false")
