"""The web page (/) and the usage dashboard (/usage) in a real browser, against the real server.

Debian's Chromium (/usr/bin/chromium, `apt-get install chromium`) driven by Playwright: a key
entered, photos dropped and chosen, background removal, a mask painted with the mouse and
erased, downloads checked as PNG and zip, the dashboard's charts drawn, its CSV saved; the
main path again at 375 px with the keyboard alone. The pages are served with a
Content-Security-Policy that forbids inline scripts and eval, so any use of them shows up here
as a console error. Screenshots go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import base64
import csv
import io
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    FileChooser,
    FilePayload,
    Page,
    Request,
    sync_playwright,
)

from tests.utils import DATA, REPO, Server, photo_bytes

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CALL_TIMEOUT_MS = 120_000
KEY_STORAGE = "imgsvc.apiKey"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: install Debian's package "
            "(`apt-get install -y chromium`; `make test` does). Browsers are never downloaded.",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@dataclass
class Tab:
    """A page with what it logged: console errors, uncaught exceptions, every URL requested."""

    page: Page
    errors: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def assert_clean(self, key: str) -> None:
        assert self.errors == [], f"the page logged errors: {self.errors}"
        leaked = [url for url in self.urls if key in url]
        assert leaked == [], f"the API key appeared in a URL: {leaked}"


@pytest.fixture
def open_tab(browser: Browser) -> Iterator[Callable[[int, int], Tab]]:
    contexts = []

    def make(width: int, height: int) -> Tab:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        tab = Tab(context.new_page())

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                tab.errors.append(message.text)

        def on_request(request: Request) -> None:
            tab.urls.append(request.url)

        tab.page.on("console", on_console)
        tab.page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
        tab.page.on("request", on_request)
        return tab

    yield make
    for context in contexts:
        context.close()


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def wait_for(page: Page, predicate: str, timeout: float = 30_000) -> None:
    """Wait until the JavaScript arrow function `predicate` returns true (a function, not an
    expression: the page's CSP forbids the eval an expression would need)."""
    page.wait_for_function(predicate, timeout=timeout)


def enter_key(page: Page, key: str) -> None:
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")
    wait_for(page, "() => document.querySelector('#key-status').classList.contains('ok')")


def drop_files(page: Page, selector: str, files: list[tuple[str, bytes, str]]) -> None:
    """A real drop: a DataTransfer holding the files, through dragenter, dragover and drop."""
    payload = [
        {"name": name, "type": mime, "b64": base64.b64encode(data).decode()}
        for name, data, mime in files
    ]
    transfer = page.evaluate_handle(
        """(files) => {
            const transfer = new DataTransfer();
            for (const f of files) {
                const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
                transfer.items.add(new File([bytes], f.name, { type: f.type }));
            }
            return transfer;
        }""",
        payload,
    )
    for event in ("dragenter", "dragover", "drop"):
        page.dispatch_event(selector, event, {"dataTransfer": transfer})


def wait_for_dashboard(page: Page) -> None:
    wait_for(page, "() => document.querySelector('#usage-status').textContent.startsWith('Up')")
    error = page.locator("#error")
    assert error.is_hidden(), f"the dashboard showed an error: {error.inner_text()}"


def paste_file(page: Page, name: str, data: bytes, mime: str) -> None:
    """A paste event whose clipboard holds one image file."""
    page.evaluate(
        """([name, b64, type]) => {
            const transfer = new DataTransfer();
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            transfer.items.add(new File([bytes], name, { type }));
            document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: transfer }));
        }""",
        [name, base64.b64encode(data).decode(), mime],
    )


def run(page: Page) -> None:
    """Press Run and wait for the call to end; fail with the page's own error text if any."""
    page.click("#run")
    wait_for_run(page)


def wait_for_run(page: Page) -> None:
    wait_for(page, "() => !document.querySelector('#run').disabled", CALL_TIMEOUT_MS)
    error = page.locator("#error")
    assert error.is_hidden(), f"the page showed an error: {error.inner_text()}"


def download(page: Page, act: Callable[[], None]) -> tuple[str, bytes]:
    with page.expect_download() as info:
        act()
    saved = info.value
    path = saved.path()
    assert path is not None
    return saved.suggested_filename, Path(path).read_bytes()


def ink(page: Page, selector: str) -> int:
    """How many pixels of a canvas are not fully transparent."""
    count: int = page.evaluate(
        """(selector) => {
            const canvas = document.querySelector(selector);
            const data = canvas.getContext('2d')
                .getImageData(0, 0, canvas.width, canvas.height).data;
            let n = 0;
            for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
            return n;
        }""",
        selector,
    )
    return count


def dataset(page: Page, selector: str, name: str) -> str:
    value = page.get_attribute(selector, f"data-{name}")
    assert value is not None, f"{selector} has no data-{name}"
    return value


def balance(server: Server, key: str) -> int:
    with server.client(key) as c:
        return int(c.get("/v1/account").json()["credits"])


def quote(server: Server, key: str, body: dict[str, Any]) -> int:
    with server.client(key) as c:
        response = c.post("/v1/quote", json=body)
        assert response.status_code == 200, response.text
        return int(response.json()["credits"])


def stroke(page: Page, selector: str, y: float, x0: float, x1: float) -> None:
    """Paint one horizontal stroke with the mouse, at fractions of the element's box."""
    box = page.locator(selector).bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * x0, box["y"] + box["height"] * y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * x1, box["y"] + box["height"] * y, steps=10)
    page.mouse.up()


def reseller_key(server: Server, credits: int) -> str:
    out = server.cli("keys", "create", "--name", "shop", "--credits", str(credits), "--reseller")
    return out.splitlines()[-1]


def test_page_and_dashboard_with_the_mouse(
    server: Server, open_tab: Callable[[int, int], Tab]
) -> None:
    key = reseller_key(server, 5000)
    tab = open_tab(1280, 900)
    page = tab.page
    response = page.goto(f"{server.url}/")
    assert response is not None and response.ok
    assert "script-src 'self'" in response.headers["content-security-policy"]

    # A wrong key: the service's message in plain words, nothing stored.
    page.fill("#api-key", "isk_not-a-real-key")
    page.click("#key-form button[type=submit]")
    wait_for(page, "() => document.querySelector('#key-status').classList.contains('bad')")
    assert "not accepted" in page.inner_text("#key-status")
    assert len(tab.errors) == 1 and "status of 401" in tab.errors[0]
    tab.errors.clear()  # the refused key's request, as expected
    enter_key(page, key)
    stored = page.evaluate(f"() => [sessionStorage.getItem('{KEY_STORAGE}'), localStorage.length]")
    assert stored == [key, 0]

    # A real drop of a real photo; the price before the call comes from /v1/quote.
    drop_files(page, "#drop-zone", [("car.jpg", photo_bytes("car.jpg"), "image/jpeg")])
    page.wait_for_selector("#file-list li")
    assert "car.jpg" in page.inner_text("#file-list")
    assert "480 × 360" in page.inner_text("#file-list")
    price = quote(server, key, {"operation": "remove-background", "width": 480, "height": 360})
    wait_for(page, "() => document.querySelector('#price').dataset.credits !== undefined")
    assert dataset(page, "#price", "credits") == str(price)
    assert f"{price} credits" in page.inner_text("#price")

    before = balance(server, key)
    run(page)
    page.wait_for_selector("#result:not([hidden])")
    assert dataset(page, "#credits", "charged") == str(price)
    assert int(dataset(page, "#credits", "remaining")) == before - price == balance(server, key)
    assert f"Charged {price} credits" in page.inner_text("#credits")
    wait_for(page, "() => document.querySelector('#after').naturalWidth === 480")
    page.fill("#compare-range", "20")
    clip = page.evaluate("() => document.querySelector('#after-layer').style.clipPath")
    assert clip == "inset(0px 0px 0px 20%)"
    screenshot(page, "desktop-remove-background.png")

    name, body = download(page, lambda: page.click("#download"))
    assert name == "car-cutout.png"
    assert body.startswith(PNG_SIGNATURE)
    cutout = Image.open(io.BytesIO(body))
    assert cutout.mode == "RGBA" and cutout.size == (480, 360)
    alpha = cutout.getchannel("A").getextrema()
    assert alpha[0] == 0 and alpha[1] == 255  # a real cut-out: some pixels gone, some kept

    # Inpaint: a mask painted with the mouse (undo works), then erased.
    page.check("input[name=operation][value=inpaint]")
    page.wait_for_selector("#mask-canvas", state="visible")
    stroke(page, "#mask-canvas", 0.5, 0.3, 0.6)
    assert ink(page, "#mask-canvas") > 0
    page.click("#mask-undo")
    assert ink(page, "#mask-canvas") == 0
    stroke(page, "#mask-canvas", 0.5, 0.3, 0.6)
    painted = ink(page, "#mask-canvas")
    assert painted > 100 * 30  # 30 % of the photo's width, the brush's 40 px high
    erase_price = quote(server, key, {"operation": "inpaint", "width": 480, "height": 360})
    wait_for(page, f"() => document.querySelector('#price').dataset.credits === '{erase_price}'")
    screenshot(page, "desktop-inpaint-mask.png")
    before = balance(server, key)
    run(page)
    notes = page.inner_text("#result-notes")
    assert re.search(r"Model: (opencv-telea|lama)", notes), notes
    assert int(dataset(page, "#credits", "remaining")) == before - erase_price
    screenshot(page, "desktop-inpaint-result.png")
    name, body = download(page, lambda: page.click("#download"))
    assert name == "car-inpainted.png" and body.startswith(PNG_SIGNATURE)
    erased = Image.open(io.BytesIO(body)).convert("RGB")
    original = Image.open(DATA / "car.jpg").convert("RGB")
    assert erased.size == original.size
    # The painted band (the middle of the photo, from 30 % to 60 % of its width) changed;
    # the corners, far from it, are the original's pixels exactly.
    band = (int(480 * 0.35), 170, int(480 * 0.55), 190)
    assert ImageChops.difference(erased.crop(band), original.crop(band)).getbbox() is not None
    for corner in ((0, 100, 60, 160), (420, 200, 480, 260)):
        assert ImageChops.difference(erased.crop(corner), original.crop(corner)).getbbox() is None

    # A sub-key of this reseller makes a call for its client, tagged with X-Client-Ref.
    with server.client(key) as c:
        made = c.post("/v1/keys", json={"name": "client-a", "monthly_cap": 500})
        assert made.status_code == 201, made.text
    with server.client(made.json()["key"]) as c:
        tagged = c.post(
            "/v1/remove-background",
            files={"image": ("car.jpg", photo_bytes("car.jpg"), "image/jpeg")},
            data={"size": "preview"},
            headers={"X-Client-Ref": "order-42"},
        )
        assert tagged.status_code == 200, tagged.text

    # The dashboard, same tab: the key is still in this tab's session storage.
    page.click("nav >> text=Usage")
    page.wait_for_url(f"{server.url}/usage")
    wait_for_dashboard(page)
    assert page.locator("#error").is_hidden()
    assert ink(page, "#chart-day") > 500
    assert ink(page, "#chart-operation") > 500
    assert page.inner_text("#total-calls") == "3"
    operations = page.inner_text("#table-operation")
    assert "inpaint" in operations and "remove-background" in operations
    assert page.locator("#subkeys-section").is_visible()
    assert "client-a" in page.inner_text("#table-keys")
    assert ink(page, "#chart-key") > 500
    assert page.locator("#clients-section").is_visible()
    assert "order-42" in page.inner_text("#table-client")
    assert page.locator("#table-recent tbody tr").count() == 3
    screenshot(page, "desktop-usage.png")

    name, body = download(page, lambda: page.click("#export-csv"))
    assert name.endswith(".csv")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(rows) == 3
    assert {r["operation"] for r in rows} == {"remove-background", "inpaint"}
    assert "order-42" in {r["client_ref"] for r in rows}
    tab.assert_clean(key)


def test_many_images_go_through_a_job(server: Server, open_tab: Callable[[int, int], Tab]) -> None:
    key = server.new_key(1000, name="batch")
    tab = open_tab(1024, 900)
    page = tab.page
    page.goto(f"{server.url}/")
    enter_key(page, key)
    page.set_input_files(
        "#file-input",
        files=FilePayload(name="car.jpg", mimeType="image/jpeg", buffer=photo_bytes("car.jpg")),
    )
    page.wait_for_selector("#file-list li")
    paste_file(page, "cloth.jpg", photo_bytes("cloth.jpg"), "image/jpeg")
    page.wait_for_selector("#file-list li:nth-child(2)")
    sizes = [(480, 360), (313, 480)]

    # The price follows the options: upscale by a factor, then to a width.
    page.check("input[name=operation][value=upscale]")
    page.fill("#up-scale", "2")
    by_two = sum(
        quote(server, key, {"operation": "upscale", "width": w, "height": h, "scale": 2})
        for w, h in sizes
    )
    wait_for(page, f"() => document.querySelector('#price').dataset.credits === '{by_two}'")
    page.check("input[name=upscale-mode][value=target]")
    page.fill("#up-width", "640")
    to_width = sum(
        quote(server, key, {"operation": "upscale", "width": w, "height": h, "target_width": 640})
        for w, h in sizes
    )
    assert to_width != by_two
    wait_for(page, f"() => document.querySelector('#price').dataset.credits === '{to_width}'")

    page.check("input[name=operation][value=remove-background]")
    page.select_option("#bg-size", "preview")
    price = sum(
        quote(server, key, {"operation": "remove-background", "width": w, "height": h, "size": s})
        for (w, h), s in zip(sizes, ["preview", "preview"], strict=True)
    )
    wait_for(page, f"() => document.querySelector('#price').dataset.credits === '{price}'")
    assert "These 2 images cost" in page.inner_text("#price")
    before = balance(server, key)
    run(page)
    page.wait_for_selector("#job-download:not([hidden])")
    statuses = page.eval_on_selector_all(
        "#job-items tr", "(rows) => rows.map((r) => r.dataset.status)"
    )
    assert statuses == ["succeeded", "succeeded"]
    assert dataset(page, "#job-status", "charged") == str(price)
    assert int(dataset(page, "#job-status", "remaining")) == before - price == balance(server, key)
    screenshot(page, "desktop-job.png")
    name, body = download(page, lambda: page.click("#job-download"))
    assert name.startswith("job_") and name.endswith(".zip")
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        names = set(archive.namelist())
        assert {"car.png", "cloth.png", "manifest.csv", "manifest.json"} <= names
        for png in ("car.png", "cloth.png"):
            assert archive.read(png).startswith(PNG_SIGNATURE)
    tab.assert_clean(key)


def tab_to(page: Page, selector: str, limit: int = 60) -> None:
    """Press Tab until the focused element matches `selector`."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("(s) => document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"{limit} presses of Tab never reached {selector}")


def no_sideways_scroll(page: Page, width: int) -> None:
    scroll_width = page.evaluate("() => document.documentElement.scrollWidth")
    assert scroll_width <= width, f"the page is {scroll_width} px wide at {width} px"


def test_keyboard_alone_at_375_px(server: Server, open_tab: Callable[[int, int], Tab]) -> None:
    key = server.new_key(1000, name="phone")
    tab = open_tab(375, 812)
    page = tab.page
    # Listening before the page loads turns file-chooser interception on in the browser well
    # before the key press that opens the chooser; turned on at the press, it can lose the race.
    choosers: list[FileChooser] = []

    def chosen(chooser: FileChooser) -> None:
        choosers.append(chooser)

    page.on("filechooser", chosen)
    page.goto(f"{server.url}/")
    no_sideways_scroll(page, 375)

    tab_to(page, "#api-key")
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    wait_for(page, "() => document.querySelector('#key-status').classList.contains('ok')")

    tab_to(page, "#file-input")
    page.keyboard.press("Space")
    for _ in range(200):
        if choosers:
            break
        page.wait_for_timeout(50)
    assert len(choosers) == 1, "Space on the file input opened no file chooser"
    choosers[0].set_files(str(DATA / "car.jpg"))
    page.wait_for_selector("#file-list li")

    tab_to(page, "input[name=operation][value=remove-background]")
    page.keyboard.press("Space")
    assert page.is_checked("input[name=operation][value=remove-background]")
    wait_for(page, "() => document.querySelector('#price').dataset.credits !== undefined")
    tab_to(page, "#run")
    page.keyboard.press("Enter")
    wait_for_run(page)
    page.wait_for_selector("#result:not([hidden])")
    assert "Charged" in page.inner_text("#credits")
    no_sideways_scroll(page, 375)
    screenshot(page, "phone-remove-background.png")

    tab_to(page, "#download")
    name, body = download(page, lambda: page.keyboard.press("Enter"))
    assert name == "car-cutout.png" and body.startswith(PNG_SIGNATURE)

    tab_to(page, "nav a[href='/usage']")  # on past the end of the page, round to the top
    page.keyboard.press("Enter")
    page.wait_for_url(f"{server.url}/usage")
    wait_for_dashboard(page)
    assert ink(page, "#chart-day") > 200
    assert page.locator("#table-recent tbody tr").count() == 1
    no_sideways_scroll(page, 375)
    screenshot(page, "phone-usage.png")
    tab.assert_clean(key)
