"""The front end, in a real browser: ComfyUI (this checkout, loopback only) with the pack, driven
by headless Chromium through selenium (Debian's ``chromium`` + ``chromium-driver``).

* the template route lists each shipped workflow once (one folder);
* every workflow loads the way the template browser loads it (its JSON from
  ``/api/workflow_templates/comfyui-mace/<name>.json`` into ``app.loadGraphData``): no
  missing-node dialog, no two node boxes overlapping (``getBounding()`` from the page, title bar
  included), our widgets present with their labels (``lambda_`` reads "lambda", from
  ``locales/en/nodeDefs.json``); a screenshot per workflow goes to ``out/browser/`` (with
  ``MACE_UPDATE_SCREENSHOTS=1`` also the template thumbnails ``workflows/<name>.jpg`` and the
  README's ``docs/comfyui_erase_style_cfr.jpg``);
* the CFR workflow is queued from the page on the tiny checkpoint (2 steps, 64 px) and its
  image appears in the history.

Marked ``browser``: skipped without chromium / chromedriver / selenium; ``.ci/run`` sets
``MACE_REQUIRE_BROWSER=1`` when Chromium is installed, and then a skip is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import comfy_harness as ch

REPO = ch.REPO_ROOT
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
NAMES = [p.stem for p in WORKFLOWS]
SHOTS = REPO / "out" / "browser"
WINDOW = (2800, 1500)  # wide enough that "fit view" zooms past the frontend's low-detail threshold

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no chromium (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


@pytest.fixture(scope="module")
def server(comfy, tiny_ckpt, tmp_path_factory):
    why = browser_missing()
    if why:
        pytest.skip(f"browser tests: {why}")
    base = tmp_path_factory.mktemp("browser_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-mace").symlink_to(REPO, target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / tiny_ckpt.name).symlink_to(tiny_ckpt)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    # The tiny checkpoint stands in for the SD1.5 file the workflows name: no "missing models"
    # dialog on top of the canvas; no first-run template dialog, no minimap.
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                    "Comfy.Workflow.ShowMissingModelsWarning": False}))
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--base-directory", str(base), "--disable-auto-launch"],
        cwd=comfy.comfy_root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                _get(url + "/system_stats")
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError("ComfyUI server did not start:\n"
                                         + (base / "server.log").read_text()[-4000:])
                time.sleep(1)
        yield url, base, tiny_ckpt.name
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def page(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    url = server[0]
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        opts.add_argument(a)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    opts.binary_location = chromium
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    driver.set_script_timeout(120)
    try:
        driver.get(url + "/")
        deadline = time.time() + 180
        while not driver.execute_script("return !!(window.app && app.graph && app.canvas)"):
            assert time.time() < deadline, "the ComfyUI page did not initialise"
            time.sleep(0.5)
        yield driver
    finally:
        driver.quit()


def load_template(driver, name: str) -> str:
    return driver.execute_async_script("""
        const cb = arguments[arguments.length - 1];
        fetch('/api/workflow_templates/comfyui-mace/' + arguments[0] + '.json')
          .then(r => r.json()).then(j => app.loadGraphData(j)).then(() => cb('ok'))
          .catch(e => cb('error: ' + e));""", name)


def fit_view(driver) -> None:
    driver.execute_async_script("""
        const cb = arguments[arguments.length - 1];
        app.extensionManager.command.execute('Comfy.Canvas.FitView').then(() => cb(1), () => cb(0));""")
    time.sleep(0.8)


def node_boxes(driver) -> list[dict]:
    return driver.execute_script("""
        return app.graph._nodes.map(n => ({id: n.id, type: n.type, title: n.title,
            box: Array.from(n.getBounding()),
            widgets: (n.widgets || []).map(w => w.label || w.name)}));""")


def missing_node_dialog(driver) -> str | None:
    return driver.execute_script("""
        const m = document.querySelector('.comfy-missing-nodes');
        if (m) return m.innerText;
        for (const d of document.querySelectorAll('[role=dialog]')) {
            if (/missing node|node types? (were )?not found/i.test(d.innerText)) return d.innerText;
        }
        return null;""")


def overlaps(nodes: list[dict]) -> list[str]:
    out = []
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["box"]
        for b in nodes[i + 1:]:
            bx, by, bw, bh = b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append(f"{a['title']!r} #{a['id']} {a['box']} overlaps {b['title']!r} #{b['id']} {b['box']}")
    return out


def expected_labels(comfy, node_type: str) -> list[str]:
    """Widget labels of one of our nodes: the declared display name where it differs."""
    labels = json.loads((REPO / "locales" / "en" / "nodeDefs.json").read_text())
    schema = comfy.nodes.NODE_CLASS_MAPPINGS[node_type].GET_SCHEMA()
    out = []
    for inp in schema.inputs:
        if inp.get_io_type() in ("MODEL", "CLIP", "CLIP_VISION", "VAE", "IMAGE", "MASK", "LATENT", "CONDITIONING"):
            continue
        out.append(labels.get(node_type, {}).get("inputs", {}).get(inp.id, {}).get("name", inp.id))
    return out


def screenshot(driver, name: str, *, update: Path | None = None, size=(640, 400)) -> Path:
    """``out/browser/<name>.png``; with ``MACE_UPDATE_SCREENSHOTS=1`` also ``update`` (a JPEG
    of the canvas, without the side and top bars, at most ``size``)."""
    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    png = SHOTS / f"{name}.png"
    driver.save_screenshot(str(png))
    if update is not None and os.environ.get("MACE_UPDATE_SCREENSHOTS") == "1":
        img = Image.open(png).convert("RGB")
        box = driver.execute_script("""  // the nodes' extent on the screen (CSS px = image px)
            const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
            let b = [Infinity, Infinity, -Infinity, -Infinity];
            for (const n of app.graph._nodes) {
                const [x, y, w, h] = n.getBounding();
                b = [Math.min(b[0], x), Math.min(b[1], y), Math.max(b[2], x + w), Math.max(b[3], y + h)];
            }
            return [r.left + (b[0] + ds.offset[0]) * ds.scale, r.top + (b[1] + ds.offset[1]) * ds.scale,
                    r.left + (b[2] + ds.offset[0]) * ds.scale, r.top + (b[3] + ds.offset[1]) * ds.scale];""")
        m = 24
        img = img.crop((max(0, int(box[0]) - m), max(0, int(box[1]) - m),
                        min(img.width, int(box[2]) + m), min(img.height, int(box[3]) + m)))
        img.thumbnail(size)
        img.save(update, quality=85)
    return png


def test_template_route_lists_each_workflow_once(server):
    listed = _get(server[0] + "/workflow_templates")
    assert sorted(listed.get("comfyui-mace", [])) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_cleanly_in_the_browser(comfy, page, name):
    assert load_template(page, name) == "ok"
    time.sleep(1.5)  # dialogs open asynchronously
    assert missing_node_dialog(page) is None
    nodes = node_boxes(page)
    spec = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    assert len(nodes) == len(spec["nodes"])
    assert overlaps(nodes) == []
    for n in nodes:
        if n["type"] in comfy.pack_node_ids:
            want = expected_labels(comfy, n["type"])
            assert n["widgets"][:len(want)] == want or set(want) <= set(n["widgets"]), (n, want)
            assert "lambda_" not in n["widgets"]
    fit_view(page)
    assert screenshot(page, name, update=REPO / "workflows" / f"{name}.jpg").is_file()


def test_cfr_workflow_runs_from_the_page(page, server):
    url, base, ckpt_name = server
    assert load_template(page, "erase_style_cfr") == "ok"
    page.execute_script("""
        const ckpt = arguments[0];
        for (const n of app.graph._nodes) {
            for (const w of n.widgets || []) {
                if (w.name === 'ckpt_name') w.value = ckpt;
                if (n.type === 'KSampler' && w.name === 'steps') w.value = 2;
                if (n.type === 'EmptyLatentImage' && (w.name === 'width' || w.name === 'height')) w.value = 64;
                // the general caption prior (1,000 captions through the 12-layer CLIP on CPU: minutes) is
                // covered by the in-process tests; here the page only has to run the graph
                if (n.type === 'MaceRefineCrossAttention' && w.name === 'prior_weight') w.value = 0;
                if (n.type === 'MaceRefineCrossAttention' && w.name === 'preset') w.value = 'custom';
            }
        }""", ckpt_name)
    before = set(_get(url + "/history"))
    page.execute_script("app.queuePrompt(0, 1)")
    deadline = time.time() + 600
    entry = None
    while time.time() < deadline:
        new = {k: v for k, v in _get(url + "/history").items() if k not in before}
        if new:
            entry = next(iter(new.values()))
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                break
        time.sleep(2)
    assert entry is not None, "nothing ran"
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images, entry["outputs"]
    img = images[0]
    assert (base / "output" / img["subfolder"] / img["filename"]).is_file()
    fit_view(page)
    screenshot(page, "erase_style_cfr_ran", update=REPO / "docs" / "comfyui_erase_style_cfr.jpg",
               size=(1400, 700))


# --------------------------------------------------------------------------------------------
# Node help pages (web/docs/<node_id>.md, scripts/build_node_docs.py)
# --------------------------------------------------------------------------------------------

def test_help_pages_are_served_where_the_frontend_asks(server, comfy):
    """The frontend (1.27+) fetches ``/extensions/<pack folder>/docs/<node_id>.md`` for a custom
    node's help; ComfyUI serves the pack's WEB_DIRECTORY there. The folder name comes from the
    node's ``python_module`` (``custom_nodes.<folder>``) in /object_info."""
    url = server[0]
    info = _get(url + "/object_info")
    for node_id in comfy.pack_node_ids:
        module = info[node_id]["python_module"]
        assert module.split(".")[0] == "custom_nodes", module
        folder = module.split(".")[1].split("@")[0]
        with urllib.request.urlopen(f"{url}/extensions/{folder}/docs/{node_id}.md", timeout=10) as r:
            assert r.read().decode() == (REPO / "web" / "docs" / f"{node_id}.md").read_text(), node_id


def test_node_info_button_opens_the_help_page(page):
    """Select the CFR node, press the selection toolbox's Info button: the node library shows our
    page (rendered markdown, not the frontend's fallback built from the description)."""
    from selenium.webdriver.common.by import By

    assert load_template(page, "erase_style_cfr") == "ok"
    fit_view(page)
    page.execute_script("""
        const n = app.graph._nodes.find(n => n.type === 'MaceRefineCrossAttention');
        app.canvas.deselectAll();
        app.canvas.selectNode(n);
        app.canvas.setDirty(true, true);""")
    deadline = time.time() + 30
    while True:
        buttons = page.find_elements(By.CSS_SELECTOR, "[data-testid=info-button]")
        if buttons and buttons[0].is_displayed():
            break
        assert time.time() < deadline, "no Info button in the selection toolbox"
        time.sleep(0.5)
    buttons[0].click()
    deadline, text = time.time() + 30, ""
    while time.time() < deadline:
        found = page.find_elements(By.CSS_SELECTOR, ".node-help-content .markdown-content")
        text = found[0].text if found else ""
        if "When to use it" in text:
            break
        time.sleep(0.5)
    assert "When to use it" in text and "Presets" in text, text[:500]
    assert not page.find_elements(By.CSS_SELECTOR, ".node-help-content .fallback-content")
    screenshot(page, "help_MaceRefineCrossAttention")


def test_advanced_flags_reach_the_frontend(page):
    """The inputs marked advanced (``comfy_compat.advanced``) arrive as ``widget.options.advanced``;
    the preset combo is there and not advanced. Whether this frontend hides them is recorded, not
    required (1.27 does not: its LiteGraph reads ``widget.advanced``, which it never sets)."""
    assert load_template(page, "mass_erase_celebrities") == "ok"
    state = page.execute_script("""
        const n = app.graph._nodes.find(n => n.type === 'MaceMassErase');
        return (n.widgets || []).map(w => ({name: w.name, advanced: !!(w.options && w.options.advanced),
                                            visible: n.isWidgetVisible ? n.isWidgetVisible(w) : true}));""")
    by_name = {w["name"]: w for w in state}
    assert by_name["lora_null_space"]["advanced"] and by_name["cfr_lambda"]["advanced"]
    assert not by_name["concepts"]["advanced"] and not by_name["preset"]["advanced"]
    shown = [w["name"] for w in state if w["visible"]]
    print(f"MaceMassErase: {len(shown)} of {len(state)} widgets shown by this frontend")
