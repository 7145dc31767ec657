"""The studio page (``GET /``) in a real headless Chromium against the real service with the demo model.

Selenium drives the page as a person would: it uploads the fixture images into the file inputs, drags a target
box (or a placement area) on the canvas with mouse events, edits the generated parameter controls and runs. The
page talks to the server over ``POST /predict`` with ``Accept: text/event-stream``; the tests watch its progress
bar advance and check the result image, the seed, the candidates' gallery, the errors and the API-key prompt.
The gallery test saves ``docs/studio.png``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageChops, ImageStat

from service.api.studio import STUDIO_ASSETS
from tests.support.server import CASE_A, ServerProcess

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("needs Chromium and chromedriver at /usr/bin (apt-get install chromium chromium-driver; .ci/run "
                "installs them)", allow_module_level=True)
pytest.importorskip("selenium", reason="needs selenium (the `test` extra)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

DEMO_ENV = {"ANYDOOR_DEMO": "1", "ANYDOOR_DEVICE": "cpu", "ANYDOOR_WARMUP_STEPS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
API_KEY = "studio-test-key"
REFERENCE = CASE_A / "reference.png"
BACKGROUND = CASE_A / "background.png"
# Written where the environment says (`ANYDOOR_STUDIO_SCREENSHOT=docs/studio.png` refreshes the README's picture),
# by default into the temporary directory: a test run never writes into the tracked tree.
SCREENSHOT = Path(os.environ.get("ANYDOOR_STUDIO_SCREENSHOT") or Path(tempfile.gettempdir()) / "anydoor-studio.png")
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run")
RUN_TIMEOUT = 180  # seconds for one generation on a shared CPU

# Installed before each run: logs what the page does that the tests check afterwards. The status and
# Content-Type of every /predict answer (the event stream, not a fallback) and its whole text (read from a clone,
# so the page reads its own copy), each value the progress bar takes (the page sets aria-valuenow with
# setAttribute) and each text the progress line shows. The hooks go in once per page.
WATCH = """
window.__log = {predict: [], bodies: [], progress: [], text: []};
if (!window.__watching) {
  window.__watching = true;
  const realFetch = window.fetch;
  window.fetch = async (...args) => {
    const response = await realFetch(...args);
    if (String(args[0]).endsWith('predict')) {
      window.__log.predict.push([response.status, response.headers.get('Content-Type')]);
      response.clone().text().then((text) => window.__log.bodies.push(text));
    }
    return response;
  };
  const bar = document.getElementById('progress');
  const setAttribute = bar.setAttribute.bind(bar);
  bar.setAttribute = (name, value) => {
    if (name === 'aria-valuenow') {
      window.__log.progress.push([Number(value), Number(bar.getAttribute('aria-valuemax'))]);
    }
    setAttribute(name, value);
  };
  new MutationObserver((records) => {
    for (const r of records) for (const n of r.addedNodes) window.__log.text.push(n.textContent);
  }).observe(document.getElementById('progress-text'), {childList: true});
}
"""


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(DEMO_ENV) as proc:
        proc.start()
        yield proc


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    profile = tempfile.mkdtemp(prefix="anydoor-studio-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1440,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: WebDriver, timeout: float = 30) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, timeout, poll_frequency=0.1)


def by_id(driver: WebDriver, element_id: str) -> WebElement:
    return driver.find_element(By.ID, element_id)


def open_studio(driver: WebDriver, url: str) -> None:
    driver.get(url)
    wait(driver).until(lambda d: d.execute_script("return document.body.dataset.spec") == "loaded")


def load_images(driver: WebDriver) -> None:
    by_id(driver, "reference-file").send_keys(str(REFERENCE))
    by_id(driver, "background-file").send_keys(str(BACKGROUND))
    wait(driver).until(lambda d: d.execute_script(
        "return document.getElementById('reference-editor').dataset.loaded === 'true'"
        " && document.getElementById('background-editor').dataset.loaded === 'true'"))


def set_value(driver: WebDriver, element_id: str, value: str) -> None:
    control = by_id(driver, element_id)
    control.clear()
    control.send_keys(value)


def drag_box(driver: WebDriver) -> tuple[int, int, int, int]:
    """Drag a box on the background canvas with the mouse; return the box it should be, in background pixels."""
    canvas = by_id(driver, "background-canvas")
    rect: dict[str, float] = driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                                   "return {w: r.width, h: r.height};", canvas)
    # From (-25%, -20%) of the displayed size around the centre to (+10%, +20%): Selenium offsets are from the
    # element's centre, in CSS pixels.
    x0, y0 = round(-0.25 * rect["w"]), round(-0.2 * rect["h"])
    dx, dy = round(0.35 * rect["w"]), round(0.4 * rect["h"])
    actions = ActionChains(driver)
    actions.move_to_element_with_offset(canvas, x0, y0).click_and_hold()
    for i in range(1, 6):
        actions.move_by_offset(dx // 5 if i < 5 else dx - 4 * (dx // 5), dy // 5 if i < 5 else dy - 4 * (dy // 5))
    actions.release().perform()
    scale = 640 / rect["w"]
    left = (rect["w"] / 2 + x0) * scale
    top = (rect["h"] / 2 + y0) * scale
    return round(left), round(top), round(dx * scale), round(dy * scale)


def run_and_wait(driver: WebDriver, outcome: str) -> None:
    """Click Run and wait for #result or #error to show."""
    driver.execute_script(WATCH)
    by_id(driver, "run").click()
    wait(driver, RUN_TIMEOUT).until(lambda d: not by_id(d, outcome).get_attribute("hidden")
                                    and by_id(d, "run").is_enabled())


def log_of(driver: WebDriver) -> dict[str, Any]:
    log: dict[str, Any] = driver.execute_script("return window.__log")
    return log


def shown_error(driver: WebDriver) -> tuple[str, str, str]:
    return (by_id(driver, "error-code").text, by_id(driver, "error-field").text,
            by_id(driver, "error-message").text)


def predict_answers(driver: WebDriver) -> list[tuple[int, str]]:
    """(status, media type) of each /predict answer the page got since the last run_and_wait."""
    return [(status, (kind or "").split(";")[0]) for status, kind in log_of(driver)["predict"]]


def assert_ran_over_the_event_stream(driver: WebDriver) -> None:
    assert predict_answers(driver) == [(200, "text/event-stream")]


def assert_result(driver: WebDriver) -> tuple[str, str]:
    """The result image is the background's size, with its seed, timings and download link; returns the seed and
    the PNG (base64)."""
    wait(driver).until(lambda d: d.execute_script("const i = document.getElementById('result-image');"
                                                  "return i.complete && i.naturalWidth > 0"))
    size = driver.execute_script("const i = document.getElementById('result-image');"
                                 "return [i.naturalWidth, i.naturalHeight]")
    assert size == [640, 480] == list(Image.open(BACKGROUND).size)
    seed = by_id(driver, "seed").text
    assert re.fullmatch(r"[0-9]+", seed), seed
    link = by_id(driver, "download")
    assert link.get_attribute("href").startswith("blob:") and link.get_attribute("download").endswith(".png")
    timings = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#timings th")]
    assert timings == ["queue", "preprocess", "encode", "sample", "decode", "postprocess", "score", "output",
                       "total"]
    # The downloadable PNG is the image the server made: decode it from the page.
    png_b64: str = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('download').href).then((r) => r.arrayBuffer()).then((buf) => {
          let s = ''; for (const b of new Uint8Array(buf)) s += String.fromCharCode(b); done(btoa(s));
        });""")
    assert Image.open(io.BytesIO(base64.b64decode(png_b64))).size == (640, 480)
    return seed, png_b64


def save_screenshot(driver: WebDriver) -> None:
    """docs/studio.png: the page with a result, tall enough to show both editors, scaled to 3/4 and in a
    256-colour palette to keep the file small."""
    size = driver.get_window_size()
    driver.set_window_size(1440, 1400)
    driver.execute_script("window.scrollTo(0, 0)")
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    driver.set_window_size(size["width"], size["height"])
    shot = shot.resize((shot.width * 3 // 4, shot.height * 3 // 4), Image.Resampling.LANCZOS)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(SCREENSHOT,
                                                                                             optimize=True)


# --- tests ----------------------------------------------------------------------------------------------------


def test_the_page_is_served_at_root_and_studio_with_its_assets_from_the_service(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        pages = [client.get(path) for path in ("/", "/studio")]
        for page in pages:
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert pages[0].text == pages[1].text
        html = pages[0].text
        assert "http://" not in html and "https://" not in html  # nothing from another host
        for asset in re.findall(r'(?:src|href)="(static/studio/[^"]+)"', html):
            assert client.get(f"/{asset}").status_code == 200, asset
        # The stylesheet and one module script, which imports the others (native ES modules, no build step).
        assert re.findall(r'(?:src|href)="(static/studio/[^"]+)"', html) == ["static/studio/studio.css",
                                                                           "static/studio/main.js"]
        assert '<script type="module" src="static/studio/main.js">' in html
        modules = sorted(path.name for path in STUDIO_ASSETS.glob("*.js"))
        assert {"main.js", "api.js", "controls.js", "editors.js", "gallery.js"} <= set(modules), modules
        imported = set()
        for name in [*modules, "studio.css"]:
            asset = client.get(f"/static/studio/{name}")
            assert asset.status_code == 200, name
            assert not re.search(r"https?://", asset.text), name
            if name.endswith(".js"):
                # Browsers run a module only with a JavaScript media type, whatever the host's MIME table says.
                assert asset.headers["content-type"] == "text/javascript; charset=utf-8", name
                for spec in re.findall(r'^import .* from "([^"]+)";$', asset.text, re.MULTILINE):
                    assert re.fullmatch(r"\./[a-z]+\.js", spec), (name, spec)  # this folder only
                    imported.add(spec[2:])
            else:
                assert asset.headers["content-type"] == "text/css; charset=utf-8"
        assert imported | {"main.js"} == set(modules)  # every module is used, and main.js is the entry
        assert "/" not in client.get("/openapi.json").json()["paths"]  # the page is not part of the API


def test_controls_are_generated_from_the_openapi_form_schema(server: ServerProcess, browser: WebDriver) -> None:
    open_studio(browser, server.url + "/studio")
    spec = httpx.get(server.url + "/openapi.json").json()
    schema = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"][
        "properties"]
    # Everything but the files, the boxes and the placement object is a parameter control.
    def is_file(prop: dict) -> bool:  # one file, or several (references, their masks)
        return "binary" in (prop.get("format"), prop.get("items", {}).get("format"))

    params = {name: prop for name, prop in schema.items() if not is_file(prop) and name not in ("box", "placement")}
    assert "steps" in params and "seed" in params
    # Two groups, each in the schema's order: the parameters marked basic, then the rest in a closed <details>.
    basic = [name for name, prop in params.items() if prop.get("x-group") == "basic"]
    advanced = [name for name in params if name not in basic]
    assert basic == ["steps", "guidance_scale", "seed", "num_outputs"]
    shown = [el.get_attribute("name") for el in browser.find_elements(By.CSS_SELECTOR, "#params [name]")]
    assert shown == basic + advanced  # every parameter, and nothing else
    assert [el.get_attribute("name") for el in browser.find_elements(
        By.CSS_SELECTOR, "#params-basic [name]")] == basic
    details = by_id(browser, "params-advanced")
    assert details.tag_name == "details" and details.get_attribute("open") is None
    assert [el.get_attribute("name") for el in details.find_elements(By.CSS_SELECTOR, "[name]")] == advanced
    assert not by_id(browser, "param-sampler").is_displayed()
    details.find_element(By.TAG_NAME, "summary").click()  # opened, the advanced ones show
    assert by_id(browser, "param-sampler").is_displayed()
    for name, prop in params.items():
        control = by_id(browser, f"param-{name}")
        label = browser.find_element(By.CSS_SELECTOR, f"label[for='param-{name}']")
        assert label.text == name
        help_text = by_id(browser, control.get_attribute("aria-describedby")).text
        assert help_text.startswith(prop["description"].replace("`", "")[:40])
        if "enum" in prop:
            assert control.tag_name == "select"
            assert [o.get_attribute("value") for o in control.find_elements(By.TAG_NAME, "option")] == prop["enum"]
            assert control.get_attribute("value") == prop["default"]
        elif prop.get("type") == "boolean":
            assert control.get_attribute("type") == "checkbox"
            assert control.is_selected() is prop["default"]
        elif prop.get("format") == "int64":
            assert control.get_attribute("type") == "text" and control.get_attribute("value") == ""
        elif prop.get("type") in ("integer", "number"):
            assert control.get_attribute("type") == "number"
            assert float(control.get_attribute("min")) == prop["minimum"]
            assert float(control.get_attribute("max")) == prop["maximum"]
            assert float(control.get_attribute("value")) == prop["default"]
        else:
            assert control.get_attribute("type") == "text"
    if "refine_reference_mask" in schema:
        assert by_id(browser, "param-refine_reference_mask").get_attribute("type") == "checkbox"

    # The placement options: one control per property of the Placement component the field refers to.
    ref = schema["placement"]["allOf"][0]["$ref"]
    assert ref == "#/components/schemas/Placement"
    placement = spec["components"]["schemas"]["Placement"]
    options = browser.find_elements(By.CSS_SELECTOR, "#placement-fields [name]")
    assert [el.get_attribute("name") for el in options] == list(placement["properties"])
    assert by_id(browser, "placement-fields").get_attribute("disabled")  # until a placement area is drawn
    for key, prop in placement["properties"].items():
        control = by_id(browser, f"placement-{key}")
        label = browser.find_element(By.CSS_SELECTOR, f"label[for='placement-{key}']").text
        assert label == (f"{key} (required)" if key in placement["required"] else key)
        assert by_id(browser, control.get_attribute("aria-describedby")).text.startswith(prop["description"][:30])
        if prop["type"] == "boolean":
            assert control.get_attribute("type") == "checkbox" and control.is_selected() is prop["default"]
        elif prop.get("format") == "int64":
            assert control.get_attribute("type") == "text"
        else:
            assert control.get_attribute("type") == "number"
            assert float(control.get_attribute("min")) == prop["minimum"]
            assert float(control.get_attribute("max")) == prop["maximum"]
            value = control.get_attribute("value")
            assert float(value) == prop["default"] if "default" in prop else value == ""

    # Every control of the page (the editors' tools appear with their images) has a label.
    load_images(browser)
    unlabelled = browser.execute_script("""
        return [...document.querySelectorAll('input, select, textarea')]
          .filter((el) => !el.labels || el.labels.length === 0).map((el) => el.id || el.outerHTML);""")
    assert unlabelled == []
    assert browser.execute_script("return [...document.querySelectorAll('[onclick], a:not([href])')].length") == 0
    assert by_id(browser, "progress").tag_name == "progress"
    assert by_id(browser, "status").get_attribute("aria-live") == "polite"


def test_a_box_dragged_on_the_background_gives_a_result_over_the_event_stream(
        server: ServerProcess, browser: WebDriver) -> None:
    open_studio(browser, server.url + "/")
    load_images(browser)
    assert "transparency" in by_id(browser, "reference-note").text  # the RGBA cut-out's alpha is the mask
    expected = drag_box(browser)
    targets = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#targets li")]
    assert len(targets) == 1, targets
    box = [int(v) for v in re.search(r"(\d+),(\d+),(\d+),(\d+)", targets[0]).groups()]  # type: ignore[union-attr]
    assert all(abs(a - b) <= 3 for a, b in zip(box, expected, strict=True)), (box, expected)
    set_value(browser, "param-steps", "2")

    run_and_wait(browser, "result")
    assert_ran_over_the_event_stream(browser)
    log = log_of(browser)
    steps = [step for step, total in log["progress"] if total == 2]
    assert steps and steps == sorted(steps) and steps[-1] == 2, log["progress"]  # the bar advanced to the end
    assert any(text.startswith("Queued") for text in log["text"]), log["text"]  # the queue position was shown
    assert any(text.startswith("Step 1 of 2") for text in log["text"]), log["text"]
    assert by_id(browser, "error").get_attribute("hidden")
    seed, png = assert_result(browser)
    assert by_id(browser, "result-regions").text.startswith("1")
    assert by_id(browser, "gallery-wrap").get_attribute("hidden")  # one output: no gallery
    assert by_id(browser, "result-scores").text.startswith("identity ")

    # The seed goes back into the seed control for reuse, exactly (seeds go past 2^53, where JavaScript numbers
    # round): the same inputs and seed give the same PNG.
    by_id(browser, "seed").click()
    assert by_id(browser, "param-seed").get_attribute("value") == seed
    assert seed in by_id(browser, "status").text
    run_and_wait(browser, "result")
    assert_ran_over_the_event_stream(browser)
    assert assert_result(browser) == (seed, png)


def result_event(driver: WebDriver) -> dict[str, Any]:
    """The JSON of the ``result`` event of the last /predict stream, as the server sent it."""
    wait(driver).until(lambda d: d.execute_script("return window.__log.bodies.length") == 1)
    text: str = driver.execute_script("return window.__log.bodies[0]")
    frames = [frame.split("\n") for frame in text.split("\n\n")]
    data = [line[6:] for lines in frames if "event: result" in lines for line in lines if line.startswith("data: ")]
    assert len(data) == 1, text[:500]
    body: dict[str, Any] = json.loads(data[0])
    return body


def download_bytes(driver: WebDriver) -> bytes:
    """The bytes behind the download link (a blob: URL), read by the page."""
    b64: str = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('download').href).then((r) => r.arrayBuffer()).then((buf) => {
          let s = ''; for (const b of new Uint8Array(buf)) s += String.fromCharCode(b); done(btoa(s));
        });""")
    return base64.b64decode(b64)


def chosen(driver: WebDriver) -> list[str]:
    return [el.get_attribute("aria-checked") for el in driver.find_elements(By.CSS_SELECTOR, "#gallery .candidate")]


def assert_shows_candidate(driver: WebDriver, body: dict[str, Any], index: int) -> None:
    """Candidate ``index`` of the answer is the one chosen, shown, and behind the download link."""
    candidate = body["candidates"][index]
    assert chosen(driver) == ["true" if i == index else "false" for i in range(len(body["candidates"]))]
    assert by_id(driver, "seed").text == str(candidate["seed"])
    assert by_id(driver, "result-candidate").text == f"{index + 1} of {len(body['candidates'])}"
    assert by_id(driver, "result-scores").text.startswith(f"identity {candidate['scores']['identity']:.3f}")
    assert by_id(driver, "result-image").get_attribute("src") == by_id(driver, "download").get_attribute("href")
    assert download_bytes(driver) == base64.b64decode(candidate["image"])


def test_candidates_show_as_a_gallery_with_scores_and_one_is_chosen_by_mouse_or_keyboard(
        server: ServerProcess, browser: WebDriver) -> None:
    open_studio(browser, server.url + "/")
    load_images(browser)
    drag_box(browser)
    set_value(browser, "param-steps", "2")
    set_value(browser, "param-num_outputs", "3")  # a basic parameter: shown without opening the advanced ones
    run_and_wait(browser, "result")
    assert_ran_over_the_event_stream(browser)
    body = result_event(browser)
    candidates = body["candidates"]
    assert len(candidates) == 3
    identities = [c["scores"]["identity"] for c in candidates]
    assert identities == sorted(identities, reverse=True)  # best first, as the server ranked them

    # Three images, each with its rank, scores and seed, in the server's order; the best is chosen at first.
    buttons = browser.find_elements(By.CSS_SELECTOR, "#gallery .candidate")
    assert len(buttons) == 3
    assert by_id(browser, "gallery").get_attribute("role") == "radiogroup"
    wait(browser).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#gallery img')].every((i) => i.complete && i.naturalWidth === 640)"))
    for i, (button, candidate) in enumerate(zip(buttons, candidates, strict=True)):
        assert button.get_attribute("role") == "radio" and button.tag_name == "button"
        text = button.text
        assert text.startswith(f"#{i + 1}") and f"seed {candidate['seed']}" in text, text
        assert f"identity {candidate['scores']['identity']:.3f}" in text, text
        psnr = candidate["scores"]["background_psnr"]
        assert (f"background PSNR {psnr:.1f} dB" if psnr is not None else "background unchanged") in text, text
    assert_shows_candidate(browser, body, 0)
    assert [b.get_attribute("tabindex") for b in buttons] == ["0", "-1", "-1"]  # one tab stop for the group
    assert by_id(browser, "download").get_attribute("download") == f"anydoor-{candidates[0]['seed']}.png"
    save_screenshot(browser)
    assert SCREENSHOT.stat().st_size < 500_000

    # A click chooses one: the result, the seed, the scores and the download become its.
    buttons[2].click()
    assert_shows_candidate(browser, body, 2)
    assert by_id(browser, "download").get_attribute("download") == f"anydoor-{candidates[2]['seed']}.png"
    assert "Candidate 3 of 3 chosen" in by_id(browser, "status").text

    # The keyboard: the arrow keys move the choice (and the focus) inside the group, Enter and Space choose.
    assert browser.switch_to.active_element == buttons[2]
    buttons[2].send_keys(Keys.ARROW_RIGHT)  # wraps around to the first
    assert_shows_candidate(browser, body, 0)
    assert browser.switch_to.active_element == buttons[0]
    assert browser.execute_script("return document.activeElement.matches(':focus-visible')")
    buttons[0].send_keys(Keys.ARROW_RIGHT)
    assert_shows_candidate(browser, body, 1)
    browser.execute_script("arguments[0].focus()", buttons[2])
    buttons[2].send_keys(Keys.ENTER)
    assert_shows_candidate(browser, body, 2)
    browser.execute_script("arguments[0].focus()", buttons[0])
    buttons[0].send_keys(Keys.SPACE)
    assert_shows_candidate(browser, body, 0)

    # The chosen seed goes back into the seed control: with one output it reproduces that candidate exactly.
    buttons[1].click()
    by_id(browser, "seed").click()
    assert by_id(browser, "param-seed").get_attribute("value") == str(candidates[1]["seed"])
    set_value(browser, "param-num_outputs", "1")
    run_and_wait(browser, "result")
    assert by_id(browser, "gallery-wrap").get_attribute("hidden")  # a single output shows as before
    # Its seed, and its image up to rounding: a batch of candidates and a single generation are not
    # bit-identical on CPU (the batched matrix products round differently), so only the pixels' mean is compared.
    again = result_event(browser)
    assert str(again["seed"]) == by_id(browser, "seed").text == str(candidates[1]["seed"])
    single, candidate = (Image.open(io.BytesIO(data)).convert("RGB")
                         for data in (download_bytes(browser), base64.b64decode(candidates[1]["image"])))
    assert max(ImageStat.Stat(ImageChops.difference(single, candidate)).mean) < 1.0

    # Another format: the link's extension and media type follow the answer's.
    set_value(browser, "param-num_outputs", "2")
    browser.find_element(By.CSS_SELECTOR, "#params-advanced summary").click()
    Select(by_id(browser, "param-output_format")).select_by_value("jpeg")
    run_and_wait(browser, "result")
    body = result_event(browser)
    assert body["media_type"] == "image/jpeg" and len(body["candidates"]) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery .candidate")) == 2
    browser.find_elements(By.CSS_SELECTOR, "#gallery .candidate")[1].click()
    assert_shows_candidate(browser, body, 1)
    link = by_id(browser, "download")
    assert link.get_attribute("download") == f"anydoor-{body['candidates'][1]['seed']}.jpg"
    assert link.get_attribute("type") == "image/jpeg" and "JPEG" in link.text
    assert download_bytes(browser)[:3] == b"\xff\xd8\xff"


def test_a_placement_area_and_the_generated_placement_options_place_the_boxes_asked(
        server: ServerProcess, browser: WebDriver) -> None:
    open_studio(browser, server.url + "/")
    load_images(browser)
    browser.find_element(By.CSS_SELECTOR, "label:has(#background-tool-area)").click()
    area = drag_box(browser)  # the same drag, with the placement-area tool: a rectangle, not a box
    targets = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#targets li")]
    assert len(targets) == 1 and targets[0].startswith("Placement area: "), targets
    shown = [int(v) for v in re.search(r"(\d+),(\d+),(\d+),(\d+)", targets[0]).groups()]  # type: ignore[union-attr]
    assert all(abs(a - b) <= 3 for a, b in zip(shown, area, strict=True)), (shown, area)
    assert not by_id(browser, "placement-fields").get_attribute("disabled")  # the options apply now
    set_value(browser, "placement-count", "2")
    set_value(browser, "placement-min_size", "40")
    set_value(browser, "placement-max_size", "70")
    set_value(browser, "placement-min_gap", "4")
    set_value(browser, "placement-seed", "9223372036854775807")  # int64 kept exact
    set_value(browser, "param-steps", "2")
    run_and_wait(browser, "result")
    assert_ran_over_the_event_stream(browser)
    body = result_event(browser)
    assert body["regions"] == 2 and len(body["boxes"]) == 2, body["boxes"]
    x0, y0, w0, h0 = shown
    for x, y, w, h in body["boxes"]:  # inside the drawn area, of the sizes asked
        assert x0 <= x and y0 <= y and x + w <= x0 + w0 and y + h <= y0 + h0, (body["boxes"], shown)
        assert 40 <= max(w, h) <= 70, (w, h)
    assert by_id(browser, "result-regions").text.startswith("2")
    assert_result(browser)

    # An option out of its bounds: the server names the placement field, the page marks that option.
    set_value(browser, "placement-count", "0")
    run_and_wait(browser, "error")
    code, field, _ = shown_error(browser)
    assert (code, field) == ("out_of_range", "placement"), shown_error(browser)
    assert by_id(browser, "placement-count").get_attribute("aria-invalid") == "true"

    # Removing the area (the keyboard way) turns the options off again.
    browser.find_element(By.CSS_SELECTOR, "#targets button[aria-label='Remove the placement area']").click()
    assert by_id(browser, "placement-fields").get_attribute("disabled")
    assert by_id(browser, "background-note").text == "Mark at least one target."


def drag(driver: WebDriver, element: WebElement, start: tuple[int, int], moves: list[tuple[int, int]]) -> None:
    actions = ActionChains(driver).move_to_element_with_offset(element, *start).click_and_hold()
    for dx, dy in moves:
        actions.move_by_offset(dx, dy)
    actions.release().perform()


def test_brushed_masks_with_brush_size_keys_and_undo(server: ServerProcess, browser: WebDriver) -> None:
    open_studio(browser, server.url + "/")
    load_images(browser)
    reference, background = by_id(browser, "reference-canvas"), by_id(browser, "background-canvas")

    # The reference: a stroke over the object becomes reference_mask (it replaces the alpha).
    drag(browser, reference, (-20, 0), [(10, 10)] * 4)
    assert "reference_mask" in by_id(browser, "reference-note").text

    # The background: the brush, its size from the keyboard, a stroke, undo, another stroke.
    browser.find_element(By.CSS_SELECTOR, "label:has(#background-tool-brush)").click()
    size = by_id(browser, "background-size-out").text
    background.click()  # focus the canvas: [ and ] act on the editor in use
    background.send_keys("]")
    bigger = by_id(browser, "background-size-out").text
    assert int(bigger.split()[0]) > int(size.split()[0]), (size, bigger)
    background.send_keys("[")
    assert by_id(browser, "background-size-out").text != bigger
    by_id(browser, "background-undo").click()  # the click above was a dot of the brush
    drag(browser, background, (-40, -20), [(20, 10)] * 4)
    assert "background_mask" in by_id(browser, "background-note").text
    by_id(browser, "background-undo").click()
    assert by_id(browser, "background-note").text == "Mark at least one target."
    drag(browser, background, (-40, -20), [(20, 10)] * 4)
    assert "background_mask" in by_id(browser, "background-note").text
    set_value(browser, "param-steps", "2")

    # A wide eraser along the same path leaves an empty mask, which is still sent: the server says so.
    browser.find_element(By.CSS_SELECTOR, "label:has(#background-tool-erase)").click()
    browser.execute_script("arguments[0].focus()", background)
    background.send_keys("]" * 12)
    assert by_id(browser, "background-size-out").text == "200 px"  # the largest size for this image
    drag(browser, background, (-40, -20), [(20, 10)] * 4)
    run_and_wait(browser, "error")
    assert shown_error(browser)[:2] == ("empty_mask", "background_mask")

    by_id(browser, "background-undo").click()  # the erasing undone
    run_and_wait(browser, "result")  # both masks were white-on-black PNGs of their images' sizes
    assert_ran_over_the_event_stream(browser)
    assert_result(browser)
    assert by_id(browser, "result-regions").text.startswith("1")


def test_errors_show_the_field_and_message(server: ServerProcess, browser: WebDriver, tmp_path: Path) -> None:
    open_studio(browser, server.url + "/")
    load_images(browser)
    set_value(browser, "param-steps", "2")

    # No target at all: the server's missing_target.
    run_and_wait(browser, "error")
    assert predict_answers(browser) == [(422, "application/json")]
    code, field, message = shown_error(browser)
    assert (code, field) == ("missing_target", "background_mask") and "target" in message
    assert by_id(browser, "error-field").is_displayed()
    assert by_id(browser, "background-canvas").get_attribute("aria-invalid") == "true"

    # An all-black mask from a file: empty_mask.
    black = tmp_path / "black.png"
    Image.new("L", (640, 480), 0).save(black)
    by_id(browser, "background-mask-file").send_keys(str(black))
    wait(browser).until(lambda d: "background_mask" in by_id(d, "background-note").text)
    run_and_wait(browser, "error")
    assert predict_answers(browser) == [(422, "application/json")]  # refused before the stream starts
    code, field, message = shown_error(browser)
    assert (code, field) == ("empty_mask", "background_mask") and "empty" in message, (code, field, message)

    # A parameter out of its bounds: the control at fault is marked.
    by_id(browser, "background-clear").click()
    by_id(browser, "box-text").send_keys("200,150,160,140")
    by_id(browser, "box-add").click()
    set_value(browser, "param-steps", "5000")
    run_and_wait(browser, "error")
    code, field, message = shown_error(browser)
    assert (code, field) == ("out_of_range", "steps") and "1000" in message
    assert by_id(browser, "param-steps").get_attribute("aria-invalid") == "true"
    assert by_id(browser, "result").get_attribute("hidden")


def test_with_an_api_key_the_page_asks_for_it_once_then_works(browser: WebDriver) -> None:
    with ServerProcess({**DEMO_ENV, "ANYDOOR_API_KEY": API_KEY}) as keyed:
        keyed.start()
        assert httpx.get(keyed.url + "/openapi.json").status_code == 401
        browser.get(keyed.url + "/")
        form = by_id(browser, "key-form")
        wait(browser).until(lambda d: form.is_displayed())  # openapi.json answered 401
        assert browser.find_element(By.CSS_SELECTOR, "label[for='api-key']").is_displayed()

        # A wrong key is refused and asked for again.
        by_id(browser, "api-key").send_keys("wrong-key")
        by_id(browser, "key-submit").click()
        wait(browser).until(lambda d: form.is_displayed() and "refused" in by_id(d, "key-reason").text)

        by_id(browser, "api-key").send_keys(API_KEY)
        by_id(browser, "key-submit").click()
        wait(browser).until(lambda d: d.execute_script("return document.body.dataset.spec") == "loaded")
        assert not form.is_displayed()
        assert browser.execute_script("return Object.values(sessionStorage)") == [API_KEY]
        assert browser.execute_script("return localStorage.length") == 0

        load_images(browser)
        by_id(browser, "box-text").send_keys("200,150,160,140")
        by_id(browser, "box-add").click()
        set_value(browser, "param-steps", "2")
        run_and_wait(browser, "result")
        assert_ran_over_the_event_stream(browser)
        assert not form.is_displayed()  # asked once: the kept key went with /predict
        assert_result(browser)


def test_an_error_event_after_the_stream_started_is_shown(browser: WebDriver) -> None:
    """A request that waits in the queue past the queue timeout gets an ``error`` event on its open stream."""
    env = {**DEMO_ENV, "ANYDOOR_QUEUE_TIMEOUT_S": "1", "ANYDOOR_MAX_BATCH": "1"}
    with ServerProcess(env) as busy, httpx.Client(base_url=busy.url, timeout=60) as client:
        busy.start()
        files = {name: (path.name, path.read_bytes(), "image/png") for name, path in (
            ("reference", REFERENCE), ("background", BACKGROUND))}
        # Another client's long generation holds the worker; its stream is closed at the end, which cancels it.
        with client.stream("POST", "/predict", files=files, data={"steps": "40", "box": "200,150,160,140"},
                           headers={"Accept": "text/event-stream"}) as blocker:
            lines = blocker.iter_lines()
            assert blocker.status_code == 200
            while next(lines) != "event: started":
                pass
            open_studio(browser, busy.url + "/")
            load_images(browser)
            by_id(browser, "box-text").send_keys("200,150,160,140")
            by_id(browser, "box-add").click()
            set_value(browser, "param-steps", "2")
            run_and_wait(browser, "error")
        assert_ran_over_the_event_stream(browser)
        assert "Queued: next" in log_of(browser)["text"]  # the queue position, from the queued event
        code, field, message = shown_error(browser)
        assert code == "queue_timeout" and message, (code, field, message)
        assert not by_id(browser, "error-field").is_displayed()  # this error names no field
        assert by_id(browser, "result").get_attribute("hidden")


def _csp_violations(driver: WebDriver) -> list[str]:
    """What the policy blocked of the service's own resources. (ReDoc's "powered by" logo comes from
    cdn.redoc.ly: blocking it is the point, as the page loads nothing from another host.)"""
    return [entry["message"] for entry in driver.get_log("browser")
            if ("Content Security Policy" in entry["message"] or "Refused to" in entry["message"])
            and "https://cdn.redoc.ly/" not in entry["message"]]


def test_the_pages_work_under_their_content_security_policy(server: ServerProcess, browser: WebDriver) -> None:
    """The studio, Swagger UI and ReDoc render with their Content-Security-Policy, and the browser reports no
    violation of it (a blocked script, style or worker would show in its console)."""
    browser.get_log("browser")  # drop what earlier tests left
    open_studio(browser, server.url + "/")
    assert _csp_violations(browser) == []
    browser.get(server.url + "/docs")
    wait(browser).until(lambda d: d.execute_script(
        "return !!document.querySelector('.swagger-ui .info .title')"))
    assert "AnyDoor Serve" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
    assert _csp_violations(browser) == []
    browser.get(server.url + "/redoc")
    wait(browser).until(lambda d: d.execute_script(
        "return !!document.querySelector('redoc h1') || !!document.querySelector('.api-info h1')"))
    assert "AnyDoor Serve" in browser.execute_script("return document.body.innerText")
    assert _csp_violations(browser) == []
