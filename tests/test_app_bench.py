"""The ``ui`` benchmark runs end to end on a small store and reports every page (no timing asserted)."""

from app.benchmarks.ui import PAGES, main


def test_ui_bench_reports_every_page(monkeypatch):
    monkeypatch.delenv("OXNET_DB_URL", raising=False)
    result = main(["--images", "200", "--repeat", "1"])
    assert result["images"] == 200
    assert set(result["page_s_cold"]) == set(result["page_s_warm"]) == set(PAGES)
    assert result["max_page_s"] == max(result["page_s_cold"].values()) > 0
