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


def server_answers(url: str, token: str, timeout: float = 60) -> bool:
    """Wait until a Jupyter server answers its status API."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/status?token={token}", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


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
    if not server_answers(url, token):
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


def panel_value(page, key: str) -> str:
    return page.locator(f"#kernel-magics-panel dd[data-key='{key}'] .km-value").inner_text()


def wait_value(page, key: str, predicate: str, timeout: float = 60_000) -> None:
    """Wait until the panel's row `key` satisfies the JS predicate on its text `v`."""
    try:
        page.wait_for_function(
            "([k, p]) => { const r = document.querySelector(`#kernel-magics-panel dd[data-key='${k}'] .km-value`);"
            " return r && (new Function('v', 'return ' + p))(r.textContent); }", arg=[key, predicate], timeout=timeout)
    except Exception:
        raise AssertionError(f"the panel's {key} never satisfied {predicate}; it shows:\n"
                             f"{page.locator('#kernel-magics-panel').inner_text()}") from None


def wait_state(page, state: str, timeout: float = 60_000) -> None:
    wait_value(page, "state", f"v === {json.dumps(state)}", timeout)


def toolbar(page) -> dict[str, bool]:
    """The panel's toolbar buttons: tooltip -> enabled."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll(
        '#kernel-magics-panel .jp-Toolbar jp-button')].map(b => [b.title, b.getAttribute('aria-disabled') !== 'true']))""")


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
    # Lab's side-panel look: a title header and an icon toolbar.
    assert panel.locator(".jp-SidePanel-header h2").inner_text().strip().lower() == "model"  # Lab shows it in capitals
    # Before the notebook ran %load_ext, the panel says what to do first, and nothing is enabled but the template.
    assert "%load_ext kernel_magics" in panel.inner_text()
    assert page.locator("#kernel-magics-status").inner_text() == "Model: not loaded"
    buttons = toolbar(page)
    assert len(buttons) == 4 and [enabled for enabled in buttons.values()] == [False, False, False, True], buttons
    page.screenshot(path=str(REPO / "docs" / "panel-before-load.tmp.png"))

    command(page, "notebook:run-all-cells")
    wait_state(page, "ready")
    assert panel_value(page, "class") == "Model" and panel_value(page, "name") == "tiny-chargen"
    assert panel_value(page, "device") == "cpu" and panel_value(page, "load").endswith(" s")
    assert not panel.locator("dd[data-key='gpu']").count()  # no GPU memory row on a CPU-only machine
    page.wait_for_function("document.querySelector('#kernel-magics-status').textContent === 'Model: ready · cpu'")
    wait_value(page, "predict", "v.endsWith(' ms')")
    assert list(toolbar(page).values()) == [True, True, True, True]

    # Unload and Load from the command palette.
    palette(page, "Unload model")
    wait_state(page, "defined")
    assert list(toolbar(page).values()) == [True, False, True, True]  # nothing to unload
    palette(page, "Load model")
    wait_state(page, "ready")

    # Export from the palette: it asks for a directory.
    palette(page, "Export model")
    dialog = page.locator(".jp-Dialog")
    dialog.locator("input").fill("exported-truss")
    dialog.locator(".jp-mod-accept").click()
    wait_value(page, "export", "v.endsWith('exported-truss')")
    assert (lab["root"] / "exported-truss" / "model" / "model.py").is_file()
    assert panel.locator("dd[data-key='export'] .km-copy").count() == 1  # a copy action for the path

    # Exporting again to that (now non-empty) directory asks before replacing; Cancel keeps it.
    (lab["root"] / "exported-truss" / "mine.txt").write_text("keep")
    palette(page, "Export model")
    dialog.locator("input").fill("exported-truss")
    dialog.locator(".jp-mod-accept").click()
    page.locator(".jp-Dialog").filter(has_text="The directory exists").wait_for()
    assert "Replace it with this export?" in page.locator(".jp-Dialog").inner_text()
    page.locator(".jp-Dialog .jp-mod-reject").click()
    assert (lab["root"] / "exported-truss" / "mine.txt").read_text() == "keep"

    # The panel in both themes, for the README.
    for theme, name in (("JupyterLab Light", "model-panel.png"), ("JupyterLab Dark", "model-panel-dark.png")):
        command(page, "apputils:change-theme", {"theme": theme})
        page.wait_for_function("t => document.body.dataset.jpThemeName === t", arg=theme)
        page.wait_for_timeout(300)
        panel.screenshot(path=str(REPO / "docs" / name))
    command(page, "apputils:change-theme", {"theme": "JupyterLab Light"})


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
    assert "Define it in a %%model cell" in panel.inner_text()


VIEWS = [
    "%load_ext kernel_magics\nimport time",
    "%%model\nclass Model:\n    def load(self):\n        print('reading shards')\n"
    "    def predict(self, model_input):\n        for word in ['saved ', 'and ', 'reopened']:\n"
    "            time.sleep(0.3)\n            yield word",
    "%model_load",
    "%model_predict {}",
    "%%model\nclass Model:\n    def load(self):\n        raise RuntimeError('no checkpoint here')\n"
    "    def predict(self, model_input):\n        return 1",
    "%model_load",
]


def test_views_saved_and_reopened_read_as_their_final_state(page, lab):
    """Live views turn into static output when they finish: a saved notebook shows that, without a kernel."""
    import nbformat

    path = lab["root"] / "views.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in VIEWS],
                                            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                     "language": "python"}}), path)
    page.goto(f"{lab['url']}/lab/tree/views.ipynb?token={lab['token']}")
    page.wait_for_function("window.jupyterapp.shell.currentWidget && window.jupyterapp.shell.currentWidget.context"
                           " && window.jupyterapp.shell.currentWidget.context.path === 'views.ipynb'"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=60_000)
    page.evaluate("() => { void window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    # Live: the stream view shows its text once, and then its final state.
    notebook.locator(".km-stream-out").first.wait_for(timeout=60_000)
    page.wait_for_function("document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')"
                           ".length >= 4 && [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden)"
                           " .jp-OutputArea-output')].some(o => o.textContent.includes('no checkpoint here'))",
                           timeout=60_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(REPO / "docs" / "live-views.png"))
    text = notebook.inner_text()
    assert text.count("saved and reopened") == 1, text  # the stream shows once: no Out[n] repeating it
    command(page, "docmanager:save")
    page.wait_for_function("!window.jupyterapp.shell.currentWidget.context.model.dirty")
    saved = json.loads(path.read_text())
    outputs = [o for c in saved["cells"] for o in c.get("outputs", [])]
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    # Reopened: what shows is what was saved (as GitHub or nbviewer would show it), no widget state needed.
    command(page, "kernelmenu:shutdown")
    page.goto(f"{lab['url']}/lab/tree/views.ipynb?token={lab['token']}&reset")
    notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    notebook.locator(".km-stream").first.wait_for(timeout=60_000)
    page.wait_for_timeout(500)
    text = notebook.inner_text()
    assert "Error displaying widget" not in text and "model not found" not in text
    assert "ready" in text and "reading shards" in text  # the load view's outcome and what load printed
    assert text.count("saved and reopened") == 1 and "done: 3 chunks" in text
    assert "failed" in text and "no checkpoint here" in text
    page.screenshot(path=str(REPO / "docs" / "reopened-notebook.png"))
    page.goto(f"{lab['url']}/lab/tree/quickstart.ipynb?token={lab['token']}")


def test_the_extension_loads_in_notebook_7(page, lab, tmp_path):
    """Notebook 7 runs JupyterLab extensions: the plugin activates and its commands and panel exist."""
    port, token = free_port(), secrets.token_hex(16)
    proc = subprocess.Popen(
        [sys.executable, "-m", "notebook", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={token}", "--allow-root", f"--ServerApp.root_dir={lab['root']}",
         "--JupyterNotebookApp.expose_app_in_browser=True"],
        stdout=open(tmp_path / "nb.log", "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        assert server_answers(url, token), (tmp_path / "nb.log").read_text()
        notebook = page.context.browser.new_page(viewport={"width": 1200, "height": 800})
        try:
            notebook.goto(f"{url}/notebooks/quickstart.ipynb?token={token}")
            notebook.wait_for_function("window.jupyterapp && window.jupyterapp.commands.hasCommand('kernel-magics:load')",
                                       timeout=60_000)
            assert notebook.evaluate("window.jupyterapp.isPluginActivated('kernel-magics:plugin')")
            notebook.evaluate("() => window.jupyterapp.commands.execute('kernel-magics:show-panel')")
            notebook.locator("#kernel-magics-panel").wait_for(state="visible", timeout=30_000)
            assert "%load_ext kernel_magics" in notebook.locator("#kernel-magics-panel").inner_text()
        finally:
            notebook.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:  # still shutting its kernel down
            proc.kill()
            proc.wait(timeout=15)
