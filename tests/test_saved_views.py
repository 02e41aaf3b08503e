"""What a finished view leaves in the notebook reads whole in nbconvert's HTML, rendered by a real Chromium:
words wrap between tokens (JupyterLab's output CSS would cut them anywhere), and the load log is not cut."""

from browser_harness import ARGS, CHROMIUM, chromium_marks, launch_env

pytestmark = chromium_marks()

CELLS = [
    "%load_ext kernel_magics\n%config ModelMagics.widgets = 'always'",
    # Load prints more lines than the live view's 10em box holds.
    "%%model\nclass Model:\n    def load(self):\n        for i in range(8):\n"
    "            print(f'reading shard {i} of 8 from a long path /data/checkpoints/model-{i}.safetensors')\n"
    "    def predict(self, model_input):\n        for i in range(300):\n            yield f'token{i} '\n",
    "%model_load",
    "%model_predict {}",
]

# For every token of the stream's text: how many line boxes it spans (2 or more: it was cut).
SPLIT_TOKENS = """(pre) => {
  const node = pre.firstChild, text = node.textContent, split = [];
  const re = /\\S+/g;
  let m;
  while ((m = re.exec(text))) {
    const range = document.createRange();
    range.setStart(node, m.index);
    range.setEnd(node, m.index + m[0].length);
    const tops = new Set([...range.getClientRects()].map((r) => Math.round(r.top)));
    if (tops.size > 1) split.push(m[0]);
  }
  return split;
}"""


def test_saved_views_in_nbconvert_html_wrap_whole_words_and_show_the_whole_load_log(tmp_path):
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter
    from playwright.sync_api import sync_playwright

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    page_html, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    assert "word-break: break-all" in page_html  # JupyterLab's output CSS, which the saved views must override
    (tmp_path / "saved.html").write_text(page_html)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS, env=launch_env())
        try:
            page = browser.new_page(viewport={"width": 520, "height": 900})
            page.goto((tmp_path / "saved.html").as_uri())
            stream = page.locator("pre.km-stream-out")
            assert "token299" in stream.inner_text()
            style = stream.evaluate("(e) => [getComputedStyle(e).wordBreak, getComputedStyle(e).whiteSpace]")
            assert style == ["normal", "pre-wrap"]
            assert stream.evaluate("(e) => e.getClientRects().length && e.scrollWidth <= e.clientWidth")  # no side scroll
            assert stream.evaluate(SPLIT_TOKENS) == []
            log = page.locator("pre.km-load-log")
            assert "reading shard 7 of 8" in log.inner_text()
            fits = log.evaluate("(e) => [getComputedStyle(e).maxHeight, e.scrollHeight <= e.clientHeight + 1]")
            assert fits == ["none", True]  # every line shows: no 10em box with a hidden scroll in a static page
            assert log.evaluate(SPLIT_TOKENS) == []
        finally:
            browser.close()


def test_the_live_stream_view_css_outranks_jupyterlabs_output_pre_rule():
    """`.jp-OutputArea-output pre` (one class, one element) sets word-break: break-all in Lab and Notebook 7;
    the live view's rule must be more specific to set it back (the browser look itself: tests/test_extension.py)."""
    import re

    from kernel_magics.notebook.widgets import _STREAM_CSS

    rule = re.search(r"([^{}]+)\{([^}]*)\}", _STREAM_CSS[_STREAM_CSS.index(".km-stream pre.km-stream-out"):])
    selector, body = rule[1].strip(), rule[2]
    classes, elements = selector.count("."), len(re.findall(r"(?:^|\s)[a-z]+", selector))
    assert (classes, elements) > (1, 1) and "word-break: normal" in body and "overflow-wrap: anywhere" in body
