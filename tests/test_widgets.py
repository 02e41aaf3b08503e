"""Live views in a real kernel: the messages a frontend receives, the Stop button, interrupts, fallbacks."""

import json
import re
import textwrap

import pytest

from kernel_harness import Kernel


@pytest.fixture
def wkernel(tmp_path):
    """A kernel that shows widget views (as JupyterLab would) with kernel_magics loaded."""
    k = Kernel(cwd=str(tmp_path))
    k.ok("%load_ext kernel_magics\n%config ModelMagics.widgets = 'always'\nimport asyncio, time, logging")
    yield k
    k.shutdown()


def define(k: Kernel, body: str) -> None:
    k.ok("%%model\n" + textwrap.dedent(body).strip() + "\n")
    k.ok("%model_load --no-widget")


def comm_opens(ex, model_name: str) -> list[str]:
    return [m["content"]["comm_id"] for m in ex.messages if m["msg_type"] == "comm_open"
            and m["content"]["data"]["state"].get("_model_name") == model_name]


def comm_msgs(ex, comm_id: str) -> list[dict]:
    return [m["content"]["data"] for m in ex.messages
            if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id]


def stream_messages(ex) -> tuple[list[dict], list[dict]]:
    (comm_id,) = comm_opens(ex, "AnyModel")
    data = comm_msgs(ex, comm_id)
    deltas = [d["content"] for d in data if d.get("method") == "custom" and d["content"].get("type") == "delta"]
    updates = [d["state"] for d in data if d.get("method") == "update"]
    return deltas, updates


def send_custom(k: Kernel, comm_id: str, content: dict) -> None:
    msg = k.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {"method": "custom", "content": content}})
    k.kc.shell_channel.send(msg)


# ---------------------------------------------------------------- coalesced deltas and the final flush

def test_stream_view_sends_coalesced_deltas_then_the_full_output_once(wkernel):
    define(wkernel, """
        class Model:
            def predict(self, model_input):
                for i in range(model_input["n"]):
                    if i % 100 == 0:
                        time.sleep(0.01)
                    yield f"t{i} "
    """)
    ex = wkernel.ok('%model_predict {"n": 5000}')
    expected = "".join(f"t{i} " for i in range(5000))
    assert ex.result is None  # shown once, in the view: no Out[n] repeating it
    assert wkernel.ok("_").result == repr(expected)
    deltas, updates = stream_messages(ex)
    final = [u for u in updates if "text" in u]
    assert len(final) == 1 and final[0]["text"] == expected and final[0]["state"] == "done"
    # Each delta carries only new text, in order; the final update completes it (no extra tail delta).
    streamed = "".join(d["text"] for d in deltas)
    assert deltas and expected.startswith(streamed) and deltas[0]["text"].startswith("t0 ")
    stats = final[0]["stats"]
    assert stats["chunks"] == 5000 and stats["first_chunk_ms"] is not None
    # At most ~30 a second (plus the first one), and far fewer than one a chunk.
    assert len(deltas) <= 31 * stats["elapsed_s"] + 2
    sent = sum(len(json.dumps(m["content"])) for m in ex.messages if m["msg_type"] == "comm_msg")
    assert sent <= 3 * len(expected)
    # When it ends, the view replaces itself with static output: that is what a saved notebook keeps.
    (final,) = [o["data"] for o in ex.outputs if o["type"] == "display_data"]
    assert "application/vnd.jupyter.widget-view+json" not in final
    assert expected in final["text/plain"] and "[done: 5000 chunks" in final["text/plain"]
    assert "t4999" in final["text/html"] and "done: 5000 chunks" in final["text/html"]


def test_dict_chunks_show_as_json_lines_and_return_a_list(wkernel):
    define(wkernel, """
        class Model:
            async def predict(self, model_input):
                for i in range(3):
                    await asyncio.sleep(0)
                    yield {"i": i}
    """)
    ex = wkernel.ok("%model_predict {}")
    assert wkernel.ok("_").result == "[{'i': 0}, {'i': 1}, {'i': 2}]"
    _, updates = stream_messages(ex)
    assert [u["text"] for u in updates if "text" in u] == ['{"i": 0}\n{"i": 1}\n{"i": 2}\n']


# ---------------------------------------------------------------- the Stop button

SLOW_FOREVER = """
    FINALLY_RAN = []
    class Model:
        def predict(self, model_input):
            try:
                i = 0
                while True:  # never ends on its own
                    yield f"{i};"
                    i += 1
                    time.sleep(0.05)
            finally:
                FINALLY_RAN.append(True)
"""


@pytest.mark.parametrize("is_async", [False, True])
def test_stop_button_ends_the_stream_while_the_cell_runs(wkernel, is_async):
    body = SLOW_FOREVER
    if is_async:
        body = body.replace("def predict", "async def predict").replace("time.sleep(0.05)", "await asyncio.sleep(0.05)")
    wkernel.ok(textwrap.dedent(body).split("class Model")[0])
    define(wkernel, "class Model" + textwrap.dedent(body).split("class Model")[1])
    sent = []

    def click_stop_on_first_delta(msg):
        if sent or msg["msg_type"] != "comm_msg":
            return
        data = msg["content"]["data"]
        if data.get("method") == "custom" and data["content"].get("type") == "delta":
            send_custom(wkernel, msg["content"]["comm_id"], {"type": "stop"})
            sent.append(True)

    ex = wkernel.execute("r = %model_predict {}\nr", on_message=click_stop_on_first_delta, timeout=60)
    # The generator never ends by itself: the cell finished because the click was handled mid-cell.
    assert ex.status == "ok" and sent
    partial = eval(ex.result)
    assert re.fullmatch(r"(\d+;)+", partial) and partial.startswith("0;")
    _, updates = stream_messages(ex)
    assert [u["state"] for u in updates if "state" in u][-1] == "stopped"
    assert wkernel.ok("FINALLY_RAN").result == "[True]"
    # The model stays usable.
    wkernel.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        yield 'ok'\n")
    wkernel.ok("%model_predict {}")
    assert wkernel.ok("_").result == "'ok'"


def no_error(k: Kernel, code: str, **kw):
    """Execute and check the cell's own outputs hold no error (read from iopub, which names the cell)."""
    ex = k.execute(code, **kw)
    assert ex.error is None and "UsageError" not in ex.stderr, f"cell failed:\n{code}\n{ex.error_text}{ex.stderr}"
    return ex


def test_a_stopped_or_failed_stream_is_not_recorded_and_exports_still_replay(wkernel):
    define(wkernel, """
        class Model:
            def predict(self, model_input):
                for i in range(model_input["n"]):
                    if model_input.get("fail") and i == 2:
                        raise ValueError("broke mid-stream")
                    yield f"{i};"
                    time.sleep(0.02)
    """)
    no_error(wkernel, '%model_predict {"n": 3}')
    assert wkernel.execute('%model_predict {"n": 5, "fail": true}').error["ename"] == "ValueError"
    sent = []

    def click_stop_on_first_delta(msg):
        data = msg["content"].get("data", {}) if msg["msg_type"] == "comm_msg" else {}
        if not sent and data.get("method") == "custom" and data["content"].get("type") == "delta":
            send_custom(wkernel, msg["content"]["comm_id"], {"type": "stop"})
            sent.append(True)

    ex = no_error(wkernel, '%model_predict {"n": 400}', on_message=click_stop_on_first_delta, timeout=60)
    _, updates = stream_messages(ex)
    assert sent and [u["state"] for u in updates if "state" in u][-1] == "stopped"
    recorded = no_error(wkernel, "[r.input for r in get_ipython().magics_manager.registry['ModelMagics'].record]")
    assert recorded.result == "[{'n': 3}]"
    # Recorded, the partial answer would make every later export refuse (the replay runs the stream to its end).
    ex = no_error(wkernel, "%model_export ./stopped-truss")
    assert "Replayed 1 recorded prediction" in ex.stdout


# ---------------------------------------------------------------- errors and interrupts keep the partial output

def test_error_mid_stream_keeps_partial_output_and_the_kernel(wkernel):
    define(wkernel, """
        class Model:
            def predict(self, model_input):
                yield "one "
                yield "two "
                raise ValueError("model broke")
    """)
    ex = wkernel.execute("%model_predict {}")
    assert ex.status == "error" and ex.error["ename"] == "ValueError"
    assert "kernel_magics" not in ex.error_text and re.search(r"Cell In\[\d+\], line 6", ex.error_text)
    _, updates = stream_messages(ex)
    last = [u for u in updates if "text" in u][-1]
    assert last["text"] == "one two " and last["state"] == "error" and "model broke" in last["error"]
    got = wkernel.ok("_m = get_ipython().magics_manager.registry['ModelMagics']\n''.join(_m.last_stream.chunks)")
    assert got.result == "'one two '"
    assert wkernel.ok("1 + 1").result == "2"


def test_interrupt_during_a_stream(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport time")
    define(k, """
        class Model:
            def predict(self, model_input):
                for i in range(10**6):
                    yield f"{i};"
                    time.sleep(0.02)
    """)
    interrupted = []

    def interrupt_once_streaming(msg):
        if not interrupted and msg["msg_type"] == "stream" and "0;" in msg["content"]["text"]:
            k.interrupt()
            interrupted.append(True)

    ex = k.execute("%model_predict {}", on_message=interrupt_once_streaming, timeout=60)
    assert interrupted and ex.status == "error" and ex.error["ename"] == "KeyboardInterrupt"
    assert "0;" in ex.stdout and "[interrupted:" in ex.stdout  # the partial output stays in the cell
    assert k.ok("len(get_ipython().magics_manager.registry['ModelMagics'].record)").result == "0"
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return 'still works'\n")
    assert k.ok("%model_predict {}").result == "'still works'"


def test_interrupt_during_a_sync_predict(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport asyncio")
    define(k, """
        class Model:
            async def predict(self, model_input):
                print("started", flush=True)
                await asyncio.sleep(60)
    """)
    sent = []
    ex = k.execute("%model_predict {}", timeout=60, on_message=lambda m: (
        not sent and m["msg_type"] == "stream" and "started" in m["content"]["text"]
        and (k.interrupt(), sent.append(1))))
    assert sent and ex.error["ename"] == "KeyboardInterrupt"
    assert k.ok("2 * 21").result == "42"


# ---------------------------------------------------------------- plain text where no widget manager is present

def test_plain_text_fallback_and_no_widget_flag(wkernel, tmp_path, fresh_kernel):
    define(wkernel, """
        class Model:
            def predict(self, model_input):
                yield from ["alpha ", "beta ", "gamma"]
    """)
    ex = wkernel.ok("%model_predict --no-widget {}")
    assert not comm_opens(ex, "AnyModel") and ex.result is None
    assert wkernel.ok("_").result == "'alpha beta gamma'"
    assert ex.stdout.startswith("alpha beta gamma\n[done: 3 chunks in ")
    # A kernel with no widget manager (as nbclient) prints plain text by default.
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport time")
    define(k, "class Model:\n    def predict(self, model_input):\n        yield from ['a', 'b']\n")
    ex = k.ok("%model_predict {}")
    assert not comm_opens(ex, "AnyModel") and "ab\n[done: 2 chunks" in ex.stdout
    # The first text is written at once (the time to it is what a user waits for), not after the coalescing
    # interval (0.5 s) with what came next.
    define(k, "class Model:\n    def predict(self, model_input):\n        yield 'first '\n        time.sleep(0.8)\n"
              "        yield from ['then ', 'the ', 'rest']\n")
    texts = [o["text"] for o in k.ok("%model_predict {}").outputs if o["type"] == "stream" and o["name"] == "stdout"]
    assert texts[0] == "first " and "".join(texts).startswith("first then the rest\n[done: 4 chunks"), texts


# ---------------------------------------------------------------- the load view

def html_values(ex) -> list[str]:
    (comm_id,) = comm_opens(ex, "HTMLModel")
    opened = [m["content"]["data"]["state"]["value"] for m in ex.messages if m["msg_type"] == "comm_open"
              and m["content"]["comm_id"] == comm_id]
    return opened + [d["state"]["value"] for d in comm_msgs(ex, comm_id) if "value" in d.get("state", {})]


def test_load_view_shows_progress_logs_and_ready(wkernel):
    wkernel.ok("%%model\nclass Model:\n    def load(self):\n        print('reading shard 1')\n"
               "        logging.getLogger('mymodel').warning('cache is cold')\n        time.sleep(0.6)\n"
               "        print('reading shard 2')\n    def predict(self, model_input):\n        return 1\n")
    ex = wkernel.ok("%model_load")
    values = [v for v in html_values(ex) if v]  # the widget opens empty, then renders
    assert ">loading</b>" in values[0] and ">ready</b>" in values[-1]
    assert len(values) >= 3  # the elapsed time ticked while load ran
    assert "reading shard 1" in values[-1] and "WARNING mymodel: cache is cold" in values[-1]
    assert "reading shard 2" in values[-1] and "device</span>cpu" in values[-1]
    assert "GPU memory" not in values[-1]  # no GPU rows on a machine without one
    # What the notebook keeps: the final state as static HTML, replacing the widget (no widget state needed).
    final = [o for o in ex.outputs if o["type"] == "display_data"][-1]["data"]
    assert "application/vnd.jupyter.widget-view+json" not in final
    assert ">ready</b>" in final["text/html"] and "reading shard 2" in final["text/html"]
    assert final["text/plain"].startswith("ready · ")


FAILING_LOAD = ("%%model\nclass Model:\n    def load(self):\n        self.ready = False\n"
                "        open('missing.ckpt')\n    def predict(self, model_input):\n        return 1\n")


def test_a_failed_load_shows_its_error_once_at_the_cells_line(wkernel):
    wkernel.ok(FAILING_LOAD)
    ex = wkernel.execute("%model_load")
    # The cell's own error, once: the user's exception, with IPython's traceback at the %%model cell's line
    # (no temp file, no IPython-internal frame such as _modified_open), and no second report as a UsageError.
    assert ex.status == "error" and ex.error["ename"] == "FileNotFoundError" and "UsageError" not in ex.stderr
    assert re.search(r"Cell In\[\d+\], line 5", ex.error_text) and "open('missing.ckpt')" in ex.error_text
    assert "_modified_open" not in ex.error_text and "ipykernel_" not in ex.error_text
    last = html_values(ex)[-1]
    assert ">failed</b>" in last and "FileNotFoundError: the error is below" in last and "missing.ckpt" not in last
    assert ">failed</b><div" in last  # no load time of "0.0 s" for a load that failed at once
    assert "state: failed" in wkernel.ok("%model_status").stdout


def test_a_failed_background_load_shows_the_cells_line_in_its_view(wkernel, tmp_path):
    gate = tmp_path / "gate"
    wkernel.ok(f"%%model\nclass Model:\n    def load(self):\n        import pathlib\n"
               f"        while not pathlib.Path({str(gate)!r}).exists():\n            time.sleep(0.02)\n"
               "        open('missing.ckpt')\n    def predict(self, model_input):\n        return 1\n")
    wkernel.ok("%model_load --background")
    # It fails once its cell has ended. (Failing while that cell still prints trips a race in
    # core/capture.py's stream swap, a RecursionError in _Tee.__getattr__ and at times a crash.)
    gate.write_text("go")
    # No cell is left to raise in: the view holds the traceback, as IPython would show it.
    ex = wkernel.ok("get_ipython().magics_manager.registry['ModelMagics'].wait_for_background_load()\n"
                    "import ipywidgets\n"
                    "print([w.value for w in list(ipywidgets.Widget.widgets.values())\n"
                    "       if isinstance(w, ipywidgets.HTML) and 'km-load' in w.value][-1])")
    assert re.search(r">failed( after \d+\.\d s)?</b>", ex.stdout), ex.stdout
    assert "<details>" in ex.stdout and "missing.ckpt" in ex.stdout
    assert re.search(r"Cell In\[\d+\], line 7", ex.stdout)
    assert "_modified_open" not in ex.stdout and "ipykernel_" not in ex.stdout


def test_background_load_returns_at_once_and_predict_waits(wkernel, tmp_path):
    gate = tmp_path / "gate"
    wkernel.ok(f"%%model\nclass Model:\n    def load(self):\n        import pathlib\n"
               f"        while not pathlib.Path({str(gate)!r}).exists():\n            time.sleep(0.02)\n"
               f"        self.v = 'loaded'\n    def predict(self, model_input):\n        return self.v\n")
    ex = wkernel.ok("%model_load --background")
    assert "Loading in the background" in ex.stdout
    assert "state: loading" in wkernel.ok("%model_status").stdout
    # The load finishes only once the predict has said it is waiting for it.
    ex = wkernel.ok("%model_predict {}", on_message=lambda m: m["msg_type"] == "stream"
                    and "Waiting for the background load" in m["content"]["text"] and gate.write_text("go"))
    assert ex.result == "'loaded'" and "Waiting for the background load to finish" in ex.stdout
    assert "state: ready" in wkernel.ok("%model_status").stdout
