"""`uda-ray report`: a self-contained HTML page, checked as text and in a real headless Chromium."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.report_data import make_sweep
from uda_ray.results.report import load, pareto_points, render, write_report
from uda_ray.storage.layout import find as resolve

SECTIONS = ("curves", "params", "importance", "pareto", "classiou", "testsel", "predictions")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, synth_root) -> Path:
    return make_sweep(tmp_path_factory.mktemp("report"), synth_root)


@pytest.fixture(scope="module")
def page(sweep, tmp_path_factory) -> Path:
    return write_report("sweep", sweep, tmp_path_factory.mktemp("page") / "r.html")


def test_every_section_has_a_plot_embedded_in_the_one_file(page):
    text = page.read_text()
    for sid in SECTIONS:
        assert re.search(rf'id="{sid}" alt="[^"]*" src="data:image/png;base64,[A-Za-z0-9+/=]{{200,}}"', text), sid
    # nothing is fetched: no http(s) URL in any src/href, no external script or stylesheet
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "<script src" not in text and "<link rel='stylesheet'" not in text


def test_table_lists_every_trial_with_its_status(page, sweep):
    text = page.read_text()
    body = text.split('<table class="sortable" id="trials">', 1)[1].split("</table>", 1)[0]
    rows = body.split("<tbody>", 1)[1].split("<tr>")[1:]
    assert len(rows) == 7
    assert sum('data-v="stopped_early"' in r for r in rows) == 1
    assert sum('data-v="errored"' in r for r in rows) == 1


def test_pareto_front_is_the_non_dominated_set(sweep):
    data = load("sweep", sweep)
    pts = {tid: (v, front) for tid, v, front, _ in pareto_points(data)}
    # t5 ended early and t6 errored: only completed trials compete
    assert set(pts) == {"t0", "t1", "t2", "t3", "t4"}
    for tid, (v, front) in pts.items():
        dominated = any(w[0] >= v[0] and w[1] <= v[1] and w != v for t, (w, _) in pts.items() if t != tid)
        assert front == (not dominated), tid
    assert pts["t2"][1] and not pts["t4"][1]  # t4: lower sel/miou than t2 at higher GFLOPs


def test_a_single_objective_sweep_has_no_pareto_section(tmp_path, synth_root):
    d = make_sweep(tmp_path, synth_root, multi=False)
    assert 'id="sec-pareto"' not in render(load("sweep", d), predictions=False)


def test_report_resolves_names_and_refuses_unknown_ones(tmp_path, sweep):
    from uda_ray.errors import UserError

    root = sweep.parent
    assert resolve(root, sweep.name) == ("sweep", sweep)
    with pytest.raises(UserError, match="nothing called 'nope'"):
        resolve(root, "nope")


def test_cli_report_writes_the_page_and_unknown_name_exits_2(tmp_path, sweep):
    from uda_ray.cli import main

    out = tmp_path / "x.html"
    assert main(["report", sweep.name, "--storage", str(sweep.parent), "--out", str(out),
                 "--no-predictions"]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["report", "nope", "--storage", str(sweep.parent), "--out", str(tmp_path / "y.html")]) == 2
    assert not (tmp_path / "y.html").exists()


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium"
    for p in (CHROMIUM, CHROMEDRIVER):
        if not os.access(p, os.X_OK):
            return p
    return None


HOW = ("install it to run this test: `apt-get install -y chromium chromium-driver` and "
       "`pip install -e '.[browser]'` (.ci/run does both)")

# every <img> decoded, drawn into a canvas and counted: a blank or broken plot has < 3 colours
IMAGE_CHECK = """
return Array.prototype.map.call(document.images, function (img) {
  var c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  var colours = 0;
  if (img.naturalWidth > 0) {
    var ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
    var d = ctx.getImageData(0, 0, c.width, c.height).data, seen = {};
    for (var i = 0; i < d.length; i += 4 * 7) { seen[d[i] + ',' + d[i + 1] + ',' + d[i + 2]] = 1; }
    colours = Object.keys(seen).length;
  }
  return [img.id, img.complete, img.naturalWidth, img.naturalHeight, colours];
});
"""


def test_report_renders_in_headless_chromium(page, tmp_path):
    missing = _browser_missing()
    if missing:
        pytest.skip(f"{missing} is missing: {HOW}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(page.as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        images = {i[0]: i[1:] for i in driver.execute_script(IMAGE_CHECK)}
        assert set(images) == set(SECTIONS)
        for sid, (complete, w, h, colours) in images.items():
            assert complete and w > 100 and h > 100 and colours >= 3, (sid, complete, w, h, colours)

        table = driver.find_element(By.ID, "trials")
        assert len(table.find_elements(By.CSS_SELECTOR, "tbody tr")) == 7
        headers = table.find_elements(By.TAG_NAME, "th")
        col = [h.text for h in headers].index("best src_val/miou")  # the objective (tests/report_data.py)

        def column() -> list[float]:
            cells = [r.find_elements(By.TAG_NAME, "td")[col].get_attribute("data-v")
                     for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
            return [float(c) for c in cells if c]

        before = column()
        headers[col].click()
        up = column()
        headers[col].click()
        down = column()
        assert len(before) == 7 and up == sorted(before) and down == sorted(before, reverse=True)

        trial_col = [h.text for h in headers].index("trial")
        headers[trial_col].click()  # text column: lexicographic
        names = [r.find_elements(By.TAG_NAME, "td")[trial_col].text
                 for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
        assert names == sorted(names)

        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
    finally:
        driver.quit()


def test_runs_and_pipelines_are_reported_too(tmp_path, sweep):
    import shutil

    shutil.copytree(sweep / "results", tmp_path / "runs" / "r1" / "results")
    for stage in ("inter", "intra"):
        shutil.copytree(sweep / "results", tmp_path / "pipelines" / "p" / stage / "results")
    assert resolve(tmp_path, "r1") == ("run", tmp_path / "runs" / "r1")
    assert resolve(tmp_path, "p") == ("pipeline", tmp_path / "pipelines" / "p")
    run_page = render(load("run", tmp_path / "runs" / "r1"), predictions=False)
    assert 'id="curves"' in run_page and 'id="sec-params"' not in run_page  # no search space: no params plot
    pipe = load("pipeline", tmp_path / "pipelines" / "p")
    assert {t["trial_id"] for t in pipe.trials} == {"inter", "intra"}  # one row per stage
    assert 'id="curves"' in render(pipe, predictions=False)
