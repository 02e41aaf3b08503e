"""The JupyterLab extension in a real JupyterLab, driven in Debian's Chromium with Playwright."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_harness import free_port

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

if not CHROMIUM.exists():
    if os.environ.get("KM_REQUIRE_BROWSER"):
        raise RuntimeError("KM_REQUIRE_BROWSER is set but /usr/bin/chromium is missing")
    pytestmark = pytest.mark.skip(reason="Debian's chromium is not installed (make test installs it as root)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(REPO / "notebooks" / "quickstart.ipynb", root / "quickstart.ipynb")
    settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No news toast over the status bar, no update checks (no network here anyway).
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = free_port(), secrets.token_hex(16)
    log = open(root / ".lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={token}", "--allow-root", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={root / '.settings'}",
         f"--LabApp.workspaces_dir={root / '.workspaces'}"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/status?token={token}", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError((root / ".lab.log").read_text())
    yield {"url": url, "token": token, "root": root}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{lab['url']}/lab/tree/quickstart.ipynb?token={lab['token']}")
        page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget "
                               "&& window.jupyterapp.shell.currentWidget.sessionContext "
                               "&& window.jupyterapp.shell.currentWidget.sessionContext.session "
                               "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel "
                               "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                               timeout=60_000)
        yield page
        browser.close()


def command(page, name: str, args: dict = None):
    return page.evaluate("([n, a]) => window.jupyterapp.commands.execute(n, a)", [name, args or {}])


def panel_row(page, label: str) -> str:
    return page.locator(f"#kernel-magics-panel tr[data-label='{label}'] td").nth(1).inner_text()


def wait_state(page, state: str, timeout: float = 60_000) -> None:
    try:
        page.wait_for_function(
            "s => { const r = document.querySelector(\"#kernel-magics-panel tr[data-label='State'] td:nth-child(2)\");"
            " return r && r.textContent === s; }", arg=state, timeout=timeout)
    except Exception:
        raise AssertionError(f"the panel never showed state {state!r}; it shows:\n"
                             f"{page.locator('#kernel-magics-panel').inner_text()}") from None


def palette(page, text: str) -> None:
    """Run a command the way a user does: the command palette, typed, Enter."""
    page.keyboard.press("Control+Shift+C")
    box = page.locator(".lm-CommandPalette-input").first
    box.wait_for(state="visible")
    box.fill(text)
    page.locator(".lm-CommandPalette-item:not(.lm-mod-disabled)").filter(has_text=text).first.click()


def test_the_panel_follows_the_notebook_and_the_commands_work(page, lab):
    command(page, "kernel-magics:show-panel")
    panel = page.locator("#kernel-magics-panel")
    panel.wait_for(state="visible")
    # Before the notebook ran %load_ext, the panel says how to load the extension.
    assert "%load_ext kernel_magics" in panel.inner_text()
    assert page.locator("#kernel-magics-status").inner_text() == "Model: not loaded"

    command(page, "notebook:run-all-cells")
    wait_state(page, "ready")
    assert panel_row(page, "Class") == "Model" and panel_row(page, "Name") == "tiny-chargen"
    assert panel_row(page, "Device") == "cpu" and panel_row(page, "Load time").endswith(" s")
    page.wait_for_function("document.querySelector('#kernel-magics-status').textContent === 'Model: ready · cpu'")
    page.wait_for_function("() => { const r = document.querySelector(\"#kernel-magics-panel tr[data-label='Last predict'] td:nth-child(2)\");"
                           " return r && r.textContent.endsWith(' ms'); }")

    # Unload and Load from the command palette.
    palette(page, "Unload model")
    wait_state(page, "defined")
    palette(page, "Load model")
    wait_state(page, "ready")

    # Export from the palette: it asks for a directory.
    palette(page, "Export model")
    dialog = page.locator(".jp-Dialog")
    dialog.locator("input").fill("exported-truss")
    dialog.locator(".jp-mod-accept").click()
    page.wait_for_function("() => { const r = document.querySelector(\"#kernel-magics-panel tr[data-label='Last export'] td:nth-child(2)\");"
                           " return r && r.textContent.endsWith('exported-truss'); }", timeout=60_000)
    assert (lab["root"] / "exported-truss" / "model" / "model.py").is_file()

    # Exporting again to that (now non-empty) directory asks before replacing; Cancel keeps it.
    (lab["root"] / "exported-truss" / "mine.txt").write_text("keep")
    palette(page, "Export model")
    dialog.locator("input").fill("exported-truss")
    dialog.locator(".jp-mod-accept").click()
    page.locator(".jp-Dialog").filter(has_text="The directory exists").wait_for()
    assert "Replace it with this export?" in page.locator(".jp-Dialog").inner_text()
    page.locator(".jp-Dialog .jp-mod-reject").click()
    assert (lab["root"] / "exported-truss" / "mine.txt").read_text() == "keep"

    page.locator("#kernel-magics-panel").screenshot(path=str(REPO / "docs" / "model-panel.png"))


def test_template_cells_and_their_highlighting(page):
    before = page.evaluate("window.jupyterapp.shell.currentWidget.content.widgets.length")
    palette(page, "Insert model template")
    page.wait_for_function(f"window.jupyterapp.shell.currentWidget.content.widgets.length === {before + 2}")
    cells = page.evaluate("window.jupyterapp.shell.currentWidget.content.widgets.map("
                          "c => [c.model.sharedModel.getSource(), c.model.mimeType])")
    sources = [s for s, _ in cells]
    config_i = next(i for i, s in enumerate(sources) if s.startswith("%%model_config\nmodel_name: my-model"))
    assert sources[config_i + 1].startswith("%%model\nclass Model:") and "def predict(self, model_input)" in sources[config_i + 1]
    page.wait_for_function(f"window.jupyterapp.shell.currentWidget.content.widgets[{config_i}].model.mimeType === 'text/x-yaml'")
    mimes = page.evaluate("window.jupyterapp.shell.currentWidget.content.widgets.map(c => c.model.mimeType)")
    assert mimes[config_i] == "text/x-yaml" and mimes[config_i + 1] == "text/x-ipython"
    plain = [m for s, m in zip(sources, mimes) if s.startswith("import") or s.startswith("# NBVAL")]
    assert plain and all(m == "text/x-ipython" for m in plain)


def test_kernel_restart_mid_load_is_shown_clearly(page):
    # A load that takes long enough to restart the kernel in the middle of it.
    page.evaluate("""() => {
        const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        k.requestExecute({code: '%%model\\nimport time\\nclass Model:\\n    def load(self):\\n        time.sleep(30)\\n'
                                 + '    def predict(self, x):\\n        return 1\\n', store_history: false});
        k.requestExecute({code: '%model_load --no-widget', store_history: false});
    }""")
    wait_state(page, "loading")
    assert page.locator("#kernel-magics-status").inner_text() == "Model: loading"
    # Not awaited: the command resolves only once its confirmation dialog is answered.
    page.evaluate("() => { void window.jupyterapp.commands.execute('kernelmenu:restart'); }")
    page.locator(".jp-Dialog .jp-mod-accept").click()
    panel = page.locator("#kernel-magics-panel")
    page.wait_for_function("document.querySelector('#kernel-magics-panel').textContent.includes('kernel restarted')")
    assert "loading" not in panel.inner_text()
    page.wait_for_function("document.querySelector('#kernel-magics-status').textContent === 'Model: not loaded'")
    # Loading the extension again in the new kernel brings the panel back.
    page.wait_for_function("window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=60_000)
    page.evaluate("window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                  ".requestExecute({code: '%load_ext kernel_magics', store_history: false})")
    wait_state(page, "not defined")
    assert "Insert model template" in panel.inner_text()
