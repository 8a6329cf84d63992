"""The page at ``/``, in a real browser (Debian's headless Chromium driven by Playwright) against a real
`bentoml serve` of the tiny model (the session's ``served_tiny``): one server and one browser.

What the page shows is compared with what the HTTP APIs answer for the same image bytes. The dataset
images come from the KMNIST files beside the clone (``../shared/data/kmnist-dev``), read, never copied.
Set ``KUZUSHIJI_PAGE_SCREENSHOT=docs/page.png`` to refresh the README's screenshot.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

from pipeline.contract import load_classmap
from pipeline.imaging import ImageLimits, load_glyph
from tests.served_model import REGISTRY_VERSION
from tests.support import PROJECT_ROOT
from tests.test_container import _checker

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("KUZUSHIJI_CHROMIUM", "/usr/bin/chromium"))
# Headless, and nothing contacted but the page's own server (no updates, sync or QUIC probes).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DEV_DATA = PROJECT_ROOT.parent / "shared" / "data" / "kmnist-dev"
SCREENSHOT_ENV = "KUZUSHIJI_PAGE_SCREENSHOT"
PAGE_DIR = PROJECT_ROOT / "page"
PAGE_MAX_BYTES = 40_000  # the whole page (HTML + CSS + JS) stays small
ANSWER_TIMEOUT_MS = 60_000  # a busy 2-core machine
LIMITS = ImageLimits(max_bytes=10**8, max_pixels=10**8)
NOT_A_KANA = "This does not look like one of the 10 kana"  # the tiny model knows 10 classes
# A 4 written in two strokes: a digit, not a kana (the tiny model scores it under its in-domain threshold).
FOUR = [[(0.6, 0.2), (0.3, 0.6), (0.75, 0.6)], [(0.6, 0.35), (0.6, 0.85)]]
# Two strokes like こ, in pad fractions: what a person writes, at the pad's scale.
KO = [[(0.30, 0.30), (0.50, 0.27), (0.70, 0.28), (0.62, 0.38)],
      [(0.25, 0.66), (0.40, 0.75), (0.60, 0.76), (0.78, 0.70)]]


@pytest.fixture
def server(served_tiny):
    return served_tiny  # the session's one server (tests/conftest.py), shared with tests/test_service.py


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium; .ci/run "
                    "does) or set KUZUSHIJI_CHROMIUM")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser: Browser, server: dict, **context_options) -> Page:
    context = browser.new_context(**({"viewport": {"width": 1100, "height": 900}} | context_options))
    page = context.new_page()
    page.set_default_timeout(ANSWER_TIMEOUT_MS)
    contacted = []
    page.on("request", lambda request: contacted.append(request.url))
    page.contacted = contacted  # type: ignore[attr-defined]
    page.goto(server["url"] + "/")
    page.wait_for_function("document.getElementById('model-info').textContent !== ''")
    return page


@pytest.fixture
def page(browser, server):
    page = _open(browser, server)
    yield page
    foreign = [url for url in page.contacted if not url.startswith((server["url"] + "/", "blob:", "data:"))]
    page.context.close()
    assert not foreign, f"the page fetched from elsewhere: {foreign}"


# ----------------------------------------------------------------------------------------- helpers


def _draw(page: Page, strokes: list[list[tuple[float, float]]]) -> None:
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        x, y = stroke[0]
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=6)
        page.mouse.up()


def _settled(page: Page) -> None:
    """Wait until no read is scheduled or in flight."""
    page.wait_for_selector("#answer[aria-busy='false']", state="attached")


def _shown_top(page: Page) -> list[tuple[str, str]]:
    """(char, "U+XXXX · class i") per line of the answer panel."""
    page.wait_for_selector("#result:not([hidden])")
    return [(item.locator(".char").inner_text(), item.locator(".codepoint").inner_text())
            for item in page.locator("#top li").all()]


def _api_top(server: dict, png: bytes, top_k: int = 5) -> list[tuple[str, str]]:
    response = server["client"].post("/predict", files={"image": ("x.png", png, "image/png")},
                                     data={"top_k": str(top_k)})
    assert response.status_code == 200, response.text
    return [(p["char"], f"{p['codepoint']} · class {p['index']}") for p in response.json()["predictions"]]


def _pad_png(page: Page) -> bytes:
    url = page.evaluate("document.getElementById('pad').toDataURL('image/png')")
    return base64.b64decode(url.split(",", 1)[1])


def _shown_glyph(page: Page, selector: str = "#glyph") -> np.ndarray:
    """The pixels of a displayed glyph <img>, read back through a canvas."""
    rgba = page.evaluate(
        """async (selector) => {
             const img = document.querySelector(selector);
             await img.decode();
             const canvas = document.createElement('canvas');
             canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
             const context = canvas.getContext('2d');
             context.drawImage(img, 0, 0);
             return {w: canvas.width, h: canvas.height,
                     data: Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data)};
           }""",
        selector,
    )
    pixels = np.array(rgba["data"], dtype=np.uint8).reshape(rgba["h"], rgba["w"], 4)
    return pixels[..., 0]


def _dataset_pngs(folder: Path, count: int, chars: str | None = None) -> list[Path]:
    """The first ``count`` test images of the KMNIST dev files (of the classes in ``chars``, if given), as
    PNGs in the dataset's format (28x28, white on black)."""
    if not DEV_DATA.is_dir():
        pytest.skip(f"{DEV_DATA} not found: the KMNIST dev files sit beside the clone in CI")
    images = np.load(DEV_DATA / "kmnist-test-imgs.npz", allow_pickle=False)["arr_0"]
    labels = np.load(DEV_DATA / "kmnist-test-labels.npz", allow_pickle=False)["arr_0"]
    classmap = load_classmap(DEV_DATA / "kmnist_classmap.csv")
    chosen = [index for index, label in enumerate(labels) if chars is None or classmap.chars[label] in chars]
    paths = []
    for index in chosen[:count]:
        path = folder / f"kmnist-test-{index}.png"
        Image.fromarray(images[index], mode="L").save(path)
        paths.append(path)
    return paths


def _drop(page: Page, selector: str, event: str, files: list[Path]) -> None:
    """Dispatch a drop or paste event carrying ``files``, as a person dragging or pasting does."""
    payload = [{"name": path.name, "data": base64.b64encode(path.read_bytes()).decode()} for path in files]
    page.evaluate(
        """([selector, event, files]) => {
             const transfer = new DataTransfer();
             for (const file of files) {
               const bytes = Uint8Array.from(atob(file.data), (c) => c.charCodeAt(0));
               transfer.items.add(new File([bytes], file.name, {type: 'image/png'}));
             }
             const target = document.querySelector(selector);
             const init = {bubbles: true, cancelable: true};
             if (event === 'paste') {
               target.dispatchEvent(new ClipboardEvent('paste', {...init, clipboardData: transfer}));
             } else {
               target.dispatchEvent(new DragEvent('dragover', {...init, dataTransfer: transfer}));
               target.dispatchEvent(new DragEvent('drop', {...init, dataTransfer: transfer}));
             }
           }""",
        [selector, event, payload],
    )


def _table_top1(page: Page) -> list[tuple[str, str]]:
    page.wait_for_selector("#batch:not([hidden])")
    _settled(page)
    return [(row.locator("td.name").inner_text(), row.locator(".top span b").first.inner_text())
            for row in page.locator("#rows tr").all()]


def _batch_top1(server: dict, paths: list[Path]) -> list[tuple[str, str]]:
    files = [("images", (path.name, path.read_bytes(), "image/png")) for path in paths]
    response = server["client"].post("/predict_batch", files=files, data={"top_k": "5"})
    assert response.status_code == 200, response.text
    return [(r["filename"], r["predictions"][0]["char"]) for r in response.json()["results"]]


# ------------------------------------------------------------------------------------------- tests


def test_the_page_is_at_the_root_and_the_openapi_page_at_docs(server):
    client = server["client"]
    root = client.get("/")
    assert root.status_code == 200 and root.headers["content-type"].startswith("text/html")
    assert 'id="pad"' in root.text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    for asset in ("/static_content/swagger-ui-bundle.js", "/page/page.js", "/page/page.css"):
        assert client.get(asset).status_code == 200, asset
    spec = client.get("/docs.json").json()
    assert {"/predict", "/predict_batch", "/glyph"} <= set(spec["paths"])
    files = [path for path in PAGE_DIR.iterdir() if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= PAGE_MAX_BYTES
    for path in files:
        assert "http://" not in path.read_text() and "https://" not in path.read_text(), path


def test_the_container_check_sees_the_page(server):
    """scripts/container_check.py checks a running container's page the same way; it can fail too."""
    check = _checker()
    check.check_page(server["client"], _scan_png())
    stock = httpx.Client(base_url="http://container.test", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, text="<div id='swagger-ui'></div>")))  # BentoML's page at /
    with pytest.raises(check.CheckFailed, match="^/: expected HTTP 200 containing 'id=\"pad\"'"):
        check.check_page(stock, _scan_png())


def _scan_png() -> bytes:
    scan = np.full((90, 60), 255, dtype=np.uint8)
    scan[20:70, 25:35] = 0  # one dark vertical stroke on white paper
    buffer = io.BytesIO()
    Image.fromarray(scan).save(buffer, "PNG")
    return buffer.getvalue()


def test_glyph_endpoint_returns_the_preprocessed_glyph_and_the_same_errors(server):
    client = server["client"]
    scan = _scan_png()
    response = client.post("/glyph", files={"image": ("stroke.png", scan, "image/png")})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    glyph = np.asarray(Image.open(io.BytesIO(response.content)))
    np.testing.assert_array_equal(glyph, load_glyph(scan, LIMITS))
    bad = {"image": ("notes.txt", b"not an image at all", "text/plain")}
    from_glyph, from_predict = client.post("/glyph", files=bad), client.post("/predict", files=bad)
    assert from_glyph.status_code == from_predict.status_code == 422
    assert from_glyph.json() == from_predict.json()


def test_a_drawn_character_is_read_as_the_api_reads_it(page, server):
    _draw(page, KO)
    _settled(page)  # read after the last stroke, without pressing anything
    shown = _shown_top(page)
    sent = _pad_png(page)
    assert shown == _api_top(server, sent)
    assert page.locator("#version").inner_text() == REGISTRY_VERSION
    assert page.locator("#top li").first.locator(".percent").inner_text().endswith("%")
    np.testing.assert_array_equal(_shown_glyph(page), load_glyph(sent, LIMITS))


def test_undo_clear_and_an_empty_pad_by_keyboard(page, server):
    pad = page.locator("#pad")
    second_stroke_middle = ("document.getElementById('pad').getContext('2d')"
                            ".getImageData(140, 210, 1, 1).data[0]")
    page.locator("#live").uncheck()
    _draw(page, KO)
    assert page.evaluate(second_stroke_middle) == 0  # black ink
    pad.focus()
    page.keyboard.press("Control+z")
    assert page.evaluate(second_stroke_middle) == 255  # the second stroke is gone
    assert _pad_png(page) != _pad_png_blank(page)
    page.keyboard.press("Escape")
    blank = _pad_png(page)
    assert blank == _pad_png_blank(page)
    page.keyboard.press("Enter")  # reads the (empty) pad: "not a kana", with the service's reason
    verdict = page.locator("#verdict.outside")
    verdict.wait_for()
    expected = server["client"].post("/predict", files={"image": ("drawing.png", blank, "image/png")})
    assert expected.status_code == 422 and expected.json()["error"]["code"] == "blank_image"
    assert verdict.inner_text() == f"{NOT_A_KANA}: {expected.json()['error']['message']}"
    assert "no visible strokes" in verdict.inner_text()
    assert page.locator("#result").is_hidden() and page.locator("#error").is_hidden()


def test_a_drawn_digit_is_not_a_kana_and_a_drawn_kana_reads_with_its_reading(page, server):
    """The page words the service's verdicts: "not a kana" for a 4, the guesses still listed and none of
    them bold; for こ its reading. Each checked against the API's answer for the same pad bytes."""
    page.locator("#live").uncheck()
    _draw(page, FOUR)
    page.locator("#read").click()
    verdict = page.locator("#verdict.outside")
    verdict.wait_for()
    api = _api_answer(server, _pad_png(page))
    assert api["in_domain"] is False and api["confident"] is False
    assert verdict.inner_text() == f"{NOT_A_KANA}: {api['reason']}."
    assert page.locator("#top").get_attribute("class") == "scores tentative"
    assert len(page.locator("#top li").all()) == len(api["predictions"])  # the guesses stay

    page.keyboard.press("Escape")
    assert page.locator("#verdict").is_hidden()
    _draw(page, KO)
    page.locator("#read").click()
    page.wait_for_selector("#verdict:not([hidden])")
    api = _api_answer(server, _pad_png(page))
    first = api["predictions"][0]
    assert page.locator("#top li").first.locator(".reading").inner_text() == first["reading"]
    if api["confident"]:
        assert page.locator("#verdict").inner_text() == f"It reads {first['char']} ({first['reading']})"
    else:
        guesses = ", ".join(f"{p['char']} ({p['reading']})" for p in api["predictions"])
        assert page.locator("#verdict").inner_text() == f"Not sure — the top guesses are {guesses}"


def _api_answer(server: dict, png: bytes) -> dict:
    response = server["client"].post("/predict", files={"image": ("drawing.png", png, "image/png")},
                                     data={"top_k": "5"})  # what the page asks for
    assert response.status_code == 200, response.text
    return response.json()


def _pad_png_blank(page: Page) -> bytes:
    url = page.evaluate("""() => {
        const pad = document.getElementById('pad');
        const canvas = document.createElement('canvas');
        canvas.width = pad.width; canvas.height = pad.height;
        const context = canvas.getContext('2d');
        context.fillStyle = '#fff'; context.fillRect(0, 0, canvas.width, canvas.height);
        return canvas.toDataURL('image/png');
    }""")
    return base64.b64decode(url.split(",", 1)[1])


def test_dataset_images_are_read_as_the_api_reads_them(page, server, tmp_path):
    paths = _dataset_pngs(tmp_path, 3)
    page.locator("#files").set_input_files(str(paths[0]))
    _settled(page)
    assert _shown_top(page) == _api_top(server, paths[0].read_bytes())
    # A 28x28 dataset glyph is already what the model reads: shown pixel for pixel.
    np.testing.assert_array_equal(_shown_glyph(page), np.asarray(Image.open(paths[0])))

    page.locator("#files").set_input_files([str(path) for path in paths])
    assert _table_top1(page) == _batch_top1(server, paths)
    for row in range(len(paths)):
        glyph = _shown_glyph(page, f"#rows tr:nth-child({row + 1}) img.glyph")
        np.testing.assert_array_equal(glyph, np.asarray(Image.open(paths[row])))


def test_dropped_and_pasted_images_are_read(page, server, tmp_path):
    paths = _dataset_pngs(tmp_path, 2)
    _drop(page, "#drop", "drop", paths)
    assert _table_top1(page) == _batch_top1(server, paths)
    _drop(page, "body", "paste", paths[1:])
    _settled(page)
    assert _shown_top(page) == _api_top(server, paths[1].read_bytes())


def test_a_bad_file_shows_the_service_error_as_it_is(page, server, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"this is not an image")
    bad = {"image": ("notes.txt", notes.read_bytes(), "text/plain")}
    expected = server["client"].post("/predict", files=bad)
    assert expected.status_code == 422
    page.locator("#files").set_input_files(str(notes))
    error = page.locator("#error .message")
    error.wait_for()
    assert error.inner_text() == expected.json()["error"]["message"]
    assert "not an image file" in error.inner_text()
    assert page.locator("#result").is_hidden()

    # In a table, the refused file's row carries the message.
    good = tmp_path / "good.png"
    Image.fromarray(np.pad(np.full((10, 4), 255, np.uint8), 9), mode="L").save(good)
    page.locator("#files").set_input_files([str(good), str(notes)])
    page.wait_for_selector("#rows td.failed")
    _settled(page)
    batch = server["client"].post("/predict_batch", files=[
        ("images", ("good.png", good.read_bytes(), "image/png")),
        ("images", ("notes.txt", notes.read_bytes(), "text/plain"))])
    assert batch.status_code == 422 and batch.json()["error"]["index"] == 1
    message = batch.json()["error"]["message"]
    assert page.locator("#rows tr").nth(1).locator("td.answer").inner_text() == message
    assert error.inner_text() == message


def test_readable_on_a_phone(browser, server, tmp_path):
    page = _open(browser, server, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                 device_scale_factor=2)
    try:
        page.locator("#files").set_input_files(str(_dataset_pngs(tmp_path, 1)[0]))
        _settled(page)
        _shown_top(page)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing runs off the side
        pad = page.locator("#pad").bounding_box()
        assert pad["width"] >= 250 and pad["x"] >= 0 and pad["x"] + pad["width"] <= 390
        top_char = page.locator("#top li .char").first
        assert float(top_char.evaluate("node => parseFloat(getComputedStyle(node).fontSize)")) >= 48
        page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)  # to look at after a run
    finally:
        page.context.close()


def test_screenshot(page, server, tmp_path):
    """The README's picture: a written character read, and a table of dataset images of the two KMNIST
    classes the tiny model knows (お, き)."""
    _draw(page, KO)
    _settled(page)
    _shown_top(page)
    page.locator("#files").set_input_files([str(path) for path in _dataset_pngs(tmp_path, 4, "おき")])
    _table_top1(page)
    target = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "page.png")
    page.screenshot(path=str(target), full_page=True)
    with Image.open(target) as shot:
        assert shot.width >= 1000 and shot.height >= 600
        # 64 flat colours keep the committed picture a third of the size, with no visible change.
        small = shot.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT,
                                             dither=Image.Dither.NONE)
    small.save(target, optimize=True)
