"""deepmask viz --html: the report's files, and the report in a real headless browser."""

import json
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from pycocotools import mask as mask_utils

from deepmask_cli.cli.main import main


@pytest.fixture
def made(tiny_weights, synth_coco, tmp_path):
    """Results of the tiny model on the synthetic photos (with --gt ids) and their report."""
    runner = CliRunner()
    props = tmp_path / "props.json"
    r = runner.invoke(main, ["propose", str(synth_coco / "images"), "-o", str(props), "--weights", str(tiny_weights),
                             "--device", "cpu", "--gt", str(synth_coco / "instances.json"), "-q"])
    assert r.exit_code == 0, r.output
    report = tmp_path / "report"
    r = runner.invoke(main, ["viz", str(props), "--html", str(report), "--gt", str(synth_coco / "instances.json")])
    assert r.exit_code == 0, r.output
    assert "index.html" in r.output
    return props, report, synth_coco


def page_data(page):
    return json.loads(re.search(r"window\.DEEPMASK = (\{.*?\});</script>", page.read_text()).group(1))


def test_report_holds_every_proposal_and_the_ground_truth(made):
    props, report, coco = made
    recs = json.loads(props.read_text())
    gt = json.loads((coco / "instances.json").read_text())
    images = sorted(p.stem for p in (coco / "images").glob("*.jpg"))
    assert sorted(p.stem for p in (report / "pages").glob("*.html")) == images
    assert sorted(p.stem for p in (report / "thumbs").glob("*.jpg")) == images
    index = (report / "index.html").read_text()
    assert all(f"pages/{name}.html" in index for name in images)
    assert (report / "report.js").stat().st_size > 1000
    for name in images:
        data = page_data(report / "pages" / f"{name}.html")
        mine = sorted((r for r in recs if r["file_name"].endswith(f"{name}.jpg")), key=lambda r: -r["score"])
        assert len(data["props"]) == len(mine) == len(data["colors"])
        for (counts, score, area), rec in zip(data["props"], mine):
            m = mask_utils.decode({"size": [data["height"], data["width"]], "counts": counts})
            assert np.array_equal(m, mask_utils.decode(rec["segmentation"])) and area == int(rec["area"])
        image_id = mine[0]["image_id"]
        assert len(data["gt"]) == sum(a["image_id"] == image_id for a in gt["annotations"])


def test_viz_refuses_mixed_outputs(made, tmp_path):
    props, _, coco = made
    r = CliRunner().invoke(main, ["viz", str(props), "-o", str(tmp_path / "a"), "--html", str(tmp_path / "b")])
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(main, ["viz", str(props), "--gt", str(coco / "instances.json")])
    assert r.exit_code == 2 and "--html" in r.output


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (.ci/install-browser.sh)")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("no headless chromium + chromedriver here (.ci/install-browser.sh installs them)")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.binary_location = binary
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_report_in_a_real_browser(made):
    """From disk, no server: the index shows every thumbnail, a page opens
    without script errors, "only" switches one mask on, and the pixels the
    page's own RLE decoder paints are exactly that mask's (pycocotools'
    decoding); the ground-truth outline draws on its own."""
    _, report, coco = made
    from selenium.webdriver.common.by import By

    browser = _browser()
    try:
        browser.get((report / "index.html").as_uri())
        widths = browser.execute_script(
            "return Promise.all([...document.images].map(i => i.decode().then(() => i.naturalWidth, () => 0)))")
        assert len(widths) == 4 and all(w > 0 for w in widths)
        browser.find_elements(By.CSS_SELECTOR, ".card a")[1].click()
        data = browser.execute_script("return window.DEEPMASK")
        assert browser.execute_script("return window.deepmaskShown()") == list(range(min(10, len(data["props"]))))
        browser.find_element(By.ID, "gt").click()  # ground truth off
        browser.find_elements(By.CSS_SELECTOR, "button.solo")[1].click()
        assert browser.execute_script("return window.deepmaskShown()") == [1]
        painted = browser.execute_script("""
            const c = document.getElementById('masks');
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const on = [];
            for (let q = 0; q < px.length / 4; q++) if (px[4 * q + 3] > 0) on.push(q);
            return on;""")
        h, w = data["height"], data["width"]
        mask = mask_utils.decode({"size": [h, w], "counts": data["props"][1][0]})
        assert painted == np.flatnonzero(mask.reshape(-1)).tolist()
        topn = browser.find_element(By.ID, "topn")
        topn.clear()
        topn.send_keys("0")
        browser.find_element(By.ID, "gt").click()  # ground truth on, alone
        assert browser.execute_script("return window.deepmaskShown()") == []
        outlined = browser.execute_script("""
            const c = document.getElementById('masks');
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let q = 3; q < px.length; q += 4) n += px[q] === 255; return n;""")
        assert outlined > 0
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        browser.quit()
