"""The explorer page end to end in a real headless Chromium (Debian's `chromium`, driven by Playwright).

The page computes everything it shows from the SVD it fetched: these tests move the slider the way a user does
(keyboard, mouse drag, a click on the spectrum) and check the shown energy, errors and the browser's own rank-k
reconstruction against NumPy.  `make test` installs chromium; without it these tests fail, they do not skip.
Set LORALAB_SCREENSHOT=docs/explore.png to also write the README's screenshot.
"""

import base64
import math
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from torch import nn

from loralab import LoraConfig, add_lora, save_adapter
from loralab.explore import make_server
from loralab.inject import lora_layers
from loralab.reference.energy import cumulative_energy, low_rank_plus_noise

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WHITE = np.array([247, 247, 247])  # the colour map at 0


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """(adapter directory, {module path: ΔW}) of an MLP with random A and B; the last layer's B is zero
    (an adapter that does nothing) and the first layer is wider than the heatmaps (96 × 300)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 8))
    add_lora(model, LoraConfig(r=6, lora_alpha=12, target_modules=["0", "2", "4"], init_lora_weights=False))
    deltas = {}
    for path, layer in lora_layers(model).items():
        a = layer.adapters["default"]
        if path == "4":
            torch.nn.init.zeros_(a.lora_B)
        deltas[path] = (a.lora_B.detach().double() @ a.lora_A.detach().double()).numpy() * a.scaling
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "a"), deltas


@pytest.fixture(scope="module")
def server(adapter):
    server = make_server(adapter[0], port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Debian's chromium is not installed: run `make test` (it installs it), or "
                    "`apt-get install -y --no-install-recommends chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A page on the explorer; fails the test on any script error or any request to another origin."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors, foreign = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: None if r.url.startswith(server.url) or r.url.startswith("data:")
            else foreign.append(r.url))
    page.goto(server.url)
    page.wait_for_selector('#stats[data-ready="true"]')
    yield page
    context.close()
    assert not errors, errors
    assert not foreign, f"the page loaded from elsewhere: {foreign}"


def shown(page, k, matrix):
    """The numbers the page shows once it has drawn rank k of `matrix`."""
    page.wait_for_selector(f'#stats[data-ready="true"][data-k="{k}"][data-matrix="{matrix}"]')
    value = lambda sel, attr: float(page.get_attribute(sel, attr))  # noqa: E731
    return {"energy": value("#energy", "data-energy"), "error": value("#error", "data-error"),
            "relative": value("#relative-error", "data-relative-error"),
            "params": value("#params", "data-params-rank"), "energy_text": page.inner_text("#energy")}


# A typed array's bytes as base64 (much faster to hand over than a list of numbers).
TO_BASE64 = "const b64 = (a) => { const u = new Uint8Array(a.buffer); let s = ''; " \
            "for (let i = 0; i < u.length; i += 8192) s += String.fromCharCode(...u.subarray(i, i + 8192)); " \
            "return btoa(s); };"


def reconstruction(page):
    """The browser's M_k at its sampled cells: (rows, cols, values (h, w))."""
    s = page.evaluate(f"() => {{ {TO_BASE64} const s = explore.state; "
                      "return {rows: s.rows, cols: s.cols, approx: b64(s.approx)}; }")
    values = np.frombuffer(base64.b64decode(s["approx"]), dtype="<f8")
    return s["rows"], s["cols"], values.reshape(len(s["rows"]), len(s["cols"]))


def pixels(page, canvas_id):
    """The RGB pixels of one canvas, (height·width, 3)."""
    data = page.evaluate(f"""() => {{ {TO_BASE64} const c = document.getElementById("{canvas_id}");
        return b64(c.getContext("2d").getImageData(0, 0, c.width, c.height).data); }}""")
    return np.frombuffer(base64.b64decode(data), dtype=np.uint8).reshape(-1, 4)[:, :3].astype(int)


def check_against_numpy(page, M, U, S, Vt, k, matrix):
    got = shown(page, k, matrix)
    expected_percent = cumulative_energy(M, (k,))[k]
    M_k = (U[:, :k] * S[:k]) @ Vt[:k]
    error = np.linalg.norm(M - M_k)
    assert 100 * got["energy"] == pytest.approx(expected_percent, rel=1e-6), k
    assert abs(float(got["energy_text"].rstrip(" %")) - expected_percent) <= 0.5e-4 + 1e-9, got["energy_text"]
    assert got["error"] == pytest.approx(error, rel=1e-6), k
    assert got["relative"] == pytest.approx(error / np.linalg.norm(M), rel=1e-6), k
    assert got["params"] == k * sum(M.shape)
    rows, cols, approx = reconstruction(page)
    assert np.abs(approx - M_k[np.ix_(rows, cols)]).max() < 1e-5 * np.abs(M).max(), k


def test_slider_energy_and_error_match_numpy_on_the_synthetic_matrix(page, tmp_path):
    M = low_rank_plus_noise(256, 8, 2.0, 0.05, 42)
    U, S, Vt = np.linalg.svd(M)
    page.select_option("#matrix", "random")  # away and back: the page reloads the synthetic matrix on request
    shown(page, 8, "random")
    page.select_option("#matrix", "synthetic")
    slider = page.locator("#rank")
    slider.focus()
    page.keyboard.press("Home")
    check_against_numpy(page, M, U, S, Vt, 1, "synthetic")
    for _ in range(7):
        page.keyboard.press("ArrowRight")
    check_against_numpy(page, M, U, S, Vt, 8, "synthetic")
    slider.fill("32")
    check_against_numpy(page, M, U, S, Vt, 32, "synthetic")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")  # 30: terms taken away one at a time
    check_against_numpy(page, M, U, S, Vt, 30, "synthetic")
    slider.fill("4")                  # 4: rebuilt from scratch
    check_against_numpy(page, M, U, S, Vt, 4, "synthetic")
    slider.blur()
    page.screenshot(path=tmp_path / "explore.png", full_page=True)
    assert (tmp_path / "explore.png").stat().st_size > 20_000
    if os.environ.get("LORALAB_SCREENSHOT"):
        page.screenshot(path=os.environ["LORALAB_SCREENSHOT"], full_page=True)


def test_dragging_the_slider_and_clicking_the_spectrum_set_the_rank(page):
    M = low_rank_plus_noise(256, 8, 2.0, 2.0, 42)
    U, S, Vt = np.linalg.svd(M)
    page.select_option("#matrix", "synthetic-noisy")
    shown(page, 8, "synthetic-noisy")
    box = page.locator("#rank").bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    k = int(page.input_value("#rank"))
    assert 40 < k < 120  # about 30% of the way along 1..256
    check_against_numpy(page, M, U, S, Vt, k, "synthetic-noisy")
    canvas = page.locator("#spectrum")
    left, width = (float(canvas.get_attribute(a)) for a in ("data-plot-left", "data-plot-width"))
    canvas.click(position={"x": left + width * 20 / 256, "y": 100})
    check_against_numpy(page, M, U, S, Vt, 20, "synthetic-noisy")


def test_full_rank_reconstruction_draws_the_original_and_a_white_error(page):
    page.select_option("#matrix", "random")
    page.locator("#rank").fill("192")
    shown(page, 192, "random")
    original, approx, error = (pixels(page, c) for c in ("heat-original", "heat-approx", "heat-error"))
    assert original.shape == (192 * 256, 3)
    assert np.abs(original - approx).max() <= 1               # the same picture, up to rounding of a colour
    assert np.abs(error - WHITE).max() <= 1                   # nothing left over
    assert original.std(axis=0).min() > 20                    # and the picture is not blank
    page.locator("#rank").fill("1")
    shown(page, 1, "random")
    assert np.abs(pixels(page, "heat-error") - WHITE).max() > 50


def test_adapter_layers_in_the_browser(page, adapter):
    dW = adapter[1]["2"]  # (64, 96)
    U, S, Vt = np.linalg.svd(dW)
    page.select_option("#matrix", "adapter:2")
    got = shown(page, 6, "adapter:2")     # the rank kept from the previous matrix (8) is cut to r = 6
    assert page.get_attribute("#rank", "max") == "6"
    assert got["energy"] == 1.0 and got["error"] == pytest.approx(0.0, abs=1e-12)
    page.locator("#rank").fill("2")
    check_against_numpy(page, dW, U, S, Vt, 2, "adapter:2")
    assert "r·(m+n) = " + f"{6 * (64 + 96):,}" in page.inner_text("#params-detail")
    assert math.isclose(float(page.get_attribute("#sigmas", "data-sigma-k")), S[1], rel_tol=1e-6)

    dW = adapter[1]["0"]  # (96, 300): the heatmaps sample it, the numbers are still exact
    U, S, Vt = np.linalg.svd(dW)
    page.select_option("#matrix", "adapter:0")
    check_against_numpy(page, dW, U, S, Vt, 2, "adapter:0")
    rows, cols, _ = reconstruction(page)
    assert len(cols) == 256 and len(rows) == round(96 * 256 / 300)
    assert "evenly spaced cells" in page.inner_text("#sampling")

    page.select_option("#matrix", "adapter:4")  # B = 0: ΔW = 0, energy undefined, nothing breaks
    shown(page, 2, "adapter:4")
    assert page.inner_text("#energy") == "– (M = 0)" and page.get_attribute("#error", "data-error") == "0"
