"""Faults and misuse: nothing lost, the concurrency bound held, no secret shown.

One test per failure found by attacking the tool as a careful user and an unlucky one would; real
kernels, real servers and real files in temporary folders.
"""

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from kernel_harness import Kernel
from server_harness import free_port, process_gone, serve_ours, write_truss
from test_export import cli, leftovers, usage_error, write_notebook

CANARY = "sk-CANARY-fault-9e1d"
SIMPLE = "%%model\nclass Model:\n    def predict(self, model_input):\n        return 1"


# ---------------------------------------------------------------- 1. data loss: --force never deletes what it did not make

def test_export_force_never_replaces_the_notebooks_folder_or_a_parent_or_the_working_directory(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    nb = write_notebook(project / "nb.ipynb", [SIMPLE])
    (project / "notes.txt").write_text("precious")
    for target, cwd in [(project, tmp_path), (tmp_path, tmp_path), (".", project), ("..", project / "sub")]:
        (project / "sub").mkdir(exist_ok=True)
        done = cli("export", nb, target, "--force", cwd=cwd)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "would replace it" in done.stderr
    assert (project / "notes.txt").read_text() == "precious" and nb.exists()
    # A folder no export made is not replaced either; an empty one is fine; an export's own is.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    done = cli("export", nb, tmp_path / "mine", "--force")
    assert done.returncode == 1 and "no export made it" in done.stderr
    assert (tmp_path / "mine" / "keep.txt").exists()
    (tmp_path / "empty").mkdir()
    assert cli("export", nb, tmp_path / "empty").returncode == 0
    assert cli("export", nb, tmp_path / "empty", "--force").returncode == 0


def test_kernel_export_after_cd_refuses_the_notebooks_folder(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    (tmp_path / "nb.ipynb").write_text("{}")
    k.ok("%load_ext kernel_magics")
    k.ok(SIMPLE)
    k.ok("import os\nos.makedirs('elsewhere', exist_ok=True)\n%cd elsewhere")
    message = usage_error(k.execute(f"%model_export {tmp_path} --force"))
    assert "would replace it" in message
    message = usage_error(k.execute("%model_export . --force"))
    assert "holds the working directory" in message
    assert (tmp_path / "nb.ipynb").exists()


# ---------------------------------------------------------------- 2. the predict bound holds until the model's code returns

GEN = '''
import os, time
from pathlib import Path

MARKERS = Path(os.environ["KM_MARKERS"])


class Model:
    def predict(self, model_input):
        if model_input.get("op") == "probe":
            (MARKERS / "probe").write_text(str(time.time()))
            return "probe"

        def gen():
            try:
                yield "first;"
                time.sleep(1.0)  # between two yields when the client leaves
                yield "second;"
            finally:
                (MARKERS / "closed").write_text(str(time.time()))

        return gen()
'''


def test_a_client_leaving_between_two_yields_keeps_the_slot_until_the_generator_closes(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    d = write_truss(tmp_path / "g", GEN, f'environment_variables: {{KM_MARKERS: "{markers}"}}\n')
    with serve_ours(d) as s:  # predict_concurrency 1
        with httpx.stream("POST", s.predict_url(), json={}, timeout=30) as r:
            assert next(r.iter_raw()) == b"first;"
        probe = httpx.post(s.predict_url(), json={"op": "probe"}, timeout=30)
        assert probe.json() == "probe"
    closed, probed = float((markers / "closed").read_text()), float((markers / "probe").read_text())
    assert probed >= closed  # the second predict started only once the generator had closed


def test_an_interrupted_sync_predict_keeps_the_slot_until_it_returns(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    started = tmp_path / "started"
    k.ok("%load_ext kernel_magics\nimport pathlib, time\nSPANS = []")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        start = time.time()\n"
         "        pathlib.Path(model_input['mark']).write_text('1')\n"
         "        time.sleep(model_input['s'])\n        SPANS.append((start, time.time()))\n        return 'done'")
    k.ok("%model_load")
    sent = []

    def interrupt_once_predict_runs(message):
        if not sent and message["msg_type"] == "status" and message["content"]["execution_state"] == "busy":
            deadline = time.monotonic() + 30
            while not started.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            k.interrupt()
            sent.append(1)

    ex = k.execute(f'%model_predict {{"s": 1.5, "mark": {json.dumps(str(started))}}}', timeout=60,
                   on_message=interrupt_once_predict_runs)
    assert ex.status == "error" and ex.error["ename"] == "KeyboardInterrupt"
    k.ok(f'%model_predict {{"s": 0, "mark": {json.dumps(str(tmp_path / "again"))}}}')
    spans = json.loads(k.ok("import json; print(json.dumps(SPANS))").stdout)
    assert len(spans) == 2 and spans[1][0] >= spans[0][1]  # the second began after the first returned


# ---------------------------------------------------------------- 3. a definition during a background load

def test_redefining_during_a_background_load_applies_after_it(tmp_path, fresh_kernel):
    gate = tmp_path / "gate"
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport time, pathlib")
    k.ok(f"%%model\nclass Model:\n    def load(self):\n        while not pathlib.Path({str(gate)!r}).exists():\n"
         f"            time.sleep(0.02)\n        self.v = 'loaded'\n    def predict(self, model_input):\n"
         f"        return self.v")
    k.ok("%model_load --background --no-widget")
    ex = k.ok("%%model\nclass Model:\n    def load(self):\n        self.v = 'loaded'\n"
              "    async def predict(self, model_input):\n        return 'async ' + self.v",
              on_message=lambda m: m["msg_type"] == "stream" and "Waiting for the background load"
              in m["content"]["text"] and gate.write_text("go"))
    assert "Hot-swapped" in ex.stdout
    assert "state: ready" in k.ok("%model_status").stdout
    assert k.ok("%model_predict {}").result == "'async loaded'"


# ---------------------------------------------------------------- 4. secrets never shown

LEAKY = '''
class Model:
    def __init__(self, secrets):
        self._s = secrets
    def load(self):
        print("token is", self._s["tok"])
        if self._s["tok"].startswith("sk-CANARY") and FAIL_LOAD:
            raise ValueError(f"bad token {self._s['tok']}")
    def predict(self, model_input):
        yield "a"
        raise RuntimeError(f"mid-stream with {self._s['tok']}")
'''


def test_a_secret_inside_errors_is_redacted_everywhere_it_is_shown(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path, env={"TRUSS_SECRET_tok": CANARY})
    port = free_port()
    k.ok("%load_ext kernel_magics\n%config ModelMagics.widgets = 'always'\nFAIL_LOAD = True")
    k.ok("%%model_config\nsecrets: {tok: null}\n")
    k.ok("%%model\n" + LEAKY)
    failed = k.execute("%model_load")  # the load view and the one-line error
    status = k.ok("%model_status")
    lab = k.ok("from kernel_magics.notebook.frontend import model_status\n"
               "print(model_status(get_ipython().magics_manager.registry['ModelMagics']))")
    plain = k.execute("%model_load --no-widget")  # the traceback IPython shows, and its saved evalue
    k.ok("FAIL_LOAD = False")
    k.ok("%model_load --no-widget")
    k.ok(f"%model_serve --port {port}")
    httpx.post(f"http://127.0.0.1:{port}/v1/models/model:predict", json={}, timeout=10)  # mid-stream error
    stream = k.execute("%model_predict {}")
    served = k.ok("%model_serve --stop")  # returns once the server, and whatever it logs, has finished
    for ex in (failed, status, lab, plain, stream, served):
        # Every message the frontend received for the cell: outputs, widget updates, the reply.
        sent = json.dumps([m["content"] for m in ex.messages]) + json.dumps(ex.reply)
        assert CANARY not in sent, sent
    view = json.dumps([m["content"] for m in failed.messages])
    assert "bad token ***" in view and "token is ***" in view  # the view's traceback and load's own print
    assert "bad token ***" in status.stdout and "bad token ***" in lab.stdout
    assert "bad token ***" in plain.error_text and plain.reply["evalue"] == "bad token ***"
    assert "mid-stream with ***" in stream.error_text


def test_the_server_logs_of_a_mid_stream_error_are_redacted(tmp_path):
    d = write_truss(tmp_path / "leaky", LEAKY.replace("FAIL_LOAD", "False"), "secrets: {tok: null}\n")
    with serve_ours(d, env={"TRUSS_SECRET_tok": CANARY}) as s:
        assert httpx.post(s.predict_url(), json={}).content == b"a"
        assert httpx.post(s.predict_url(), json={}, headers={"accept": "application/json"}).status_code == 500
    assert CANARY not in s.log and "mid-stream with ***" in s.log


# ---------------------------------------------------------------- 5. memory a failure holds is released by unload

def test_unload_releases_what_a_failed_load_and_a_failed_predict_hold(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport gc, psutil, weakref\nALIVE = weakref.WeakSet()\n"
         "class Blob:\n    def __init__(self):\n        self.data = bytearray(50 * 2**20)\n"
         "def rss():\n    gc.collect()\n    return psutil.Process().memory_info().rss")
    k.ok("%%model\nclass Model:\n    def load(self):\n        self.blob = Blob()\n        ALIVE.add(self.blob)\n"
         "        raise RuntimeError('no more room')\n    def predict(self, model_input):\n        return 1")
    before = int(k.ok("print(rss())").stdout)
    assert k.execute("%model_load --no-widget").status == "error"
    assert k.ok("print(len(ALIVE))").stdout.strip() == "1"
    assert "Model unloaded" in k.ok("%model_unload").stdout
    assert k.ok("print(len(ALIVE))").stdout.strip() == "0"
    assert int(k.ok("print(rss())").stdout) - before < 20 * 2**20
    # A failed predict: its frames (and the 50 MB they hold) go with the next unload too.
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        blob = Blob()\n"
         "        ALIVE.add(blob)\n        raise ValueError('predict failed')")
    k.ok("%model_load --no-widget")
    assert k.execute("%model_predict {}").status == "error"
    assert k.ok("print(len(ALIVE))").stdout.strip() == "1"
    k.ok("%model_unload")
    assert k.ok("print(len(ALIVE))").stdout.strip() == "0"


# ---------------------------------------------------------------- 6. leftovers and races in export

def test_force_over_a_symlink_and_over_read_only_parts_leaves_nothing_behind(tmp_path):
    nb = write_notebook(tmp_path / "nb.ipynb", [SIMPLE])
    assert cli("export", nb, tmp_path / "real").returncode == 0
    (tmp_path / "link").symlink_to(tmp_path / "real")
    done = cli("export", nb, tmp_path / "link", "--force")
    assert done.returncode == 1 and "is a symbolic link" in done.stderr
    (tmp_path / "real" / "data" / "locked").mkdir(parents=True)
    (tmp_path / "real" / "data" / "locked" / "f.txt").write_text("x")
    os.chmod(tmp_path / "real" / "data" / "locked", 0o500)
    done = cli("export", nb, tmp_path / "real", "--force", "--force")  # twice: the files are not the export's
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
    assert leftovers(tmp_path) == [] and not (tmp_path / "real" / "data" / "locked").exists()


@pytest.mark.parametrize("notebooks", [2, 1], ids=["two notebooks", "one notebook twice"])
def test_two_exports_to_one_new_target_at_once_never_both_write_it(tmp_path, notebooks):
    """Two notebooks' exports: one fails. The same notebook's twice: the one that finishes second may replace the
    first (its own export, unchanged) or stop; either way one whole export is there and nothing else."""
    paths = [write_notebook(tmp_path / f"nb{i % notebooks}.ipynb", [SIMPLE]) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "kernel_magics", "export", str(nb), str(tmp_path / "out")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for nb in paths]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1] or (notebooks == 1 and codes == [0, 0]), results
    for code, err in results:
        if code == 1:
            assert any(reason in err for reason in ("changed while this export ran", "holds an earlier export of nb")) \
                and "Traceback" not in err, err
    assert (tmp_path / "out" / "model" / "model.py").is_file() and (tmp_path / "out" / ".kernel-magics-export").is_file()
    assert leftovers(tmp_path) == []


def test_a_folder_removed_by_two_sweeps_at_once_is_removed_without_an_error(tmp_path):
    """Two checks' sweeps can remove the same stale folder at once: the one that found a subfolder gone before it
    opened it raised a TypeError (rmtree's error handler called os.open again with the path alone), and an export
    failed with it in a whole run. Four threads remove one small tree at once, six times (before the fix, seven
    to ten of the 24 removals failed)."""
    import threading

    from kernel_magics.core.scratch import remove_tree

    failures = []
    for round_ in range(6):
        root = tmp_path / f"stale{round_}"
        for i in range(30):
            (root / f"d{i}" / "sub").mkdir(parents=True)
            for j in range(2):
                (root / f"d{i}" / "sub" / f"f{j}").write_text("x")

        def remove(root=root):
            try:
                assert remove_tree(root) is True
            except BaseException as exc:  # (a thread's error is the test's failure)
                failures.append(repr(exc))

        threads = [threading.Thread(target=remove) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not root.exists()
    assert failures == []


# ---------------------------------------------------------------- 7. one-line errors for broken files and folders

def test_broken_inputs_get_one_line_and_exit_code_1(tmp_path):
    nb = write_notebook(tmp_path / "nb.ipynb", [SIMPLE])
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    (tmp_path / "dangling.ipynb").symlink_to(tmp_path / "nowhere.ipynb")
    (tmp_path / "binary.ipynb").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "deep.ipynb").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "latin1.ipynb").write_bytes(json.dumps({"cells": [{"cell_type": "code", "source": "x = 'é'"}]})
                                            .encode().replace(b"\\u00e9", b"\xe9"))
    cases = [(nb, tmp_path / "ro" / "out", "permission"), (tmp_path / "dangling.ipynb", tmp_path / "o", "broken"),
             (tmp_path / "binary.ipynb", tmp_path / "o", "not UTF-8"), (tmp_path / "deep.ipynb", tmp_path / "o", "deeply"),
             (tmp_path / "latin1.ipynb", tmp_path / "o", "not UTF-8")]
    if os.geteuid() == 0:
        cases = cases[1:]  # root writes anywhere: no read-only folder for it
    for notebook, out, fragment in cases:
        done = cli("export", notebook, out)
        assert done.returncode == 1, (notebook, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert fragment.lower() in done.stderr.lower(), done.stderr


# ---------------------------------------------------------------- 8. a YAML alias bomb is refused at once

def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{n}: &{n} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    write_truss(tmp_path / "bomb", "class Model:\n    def predict(self, x):\n        return x\n", bomb)
    started = time.perf_counter()
    done = cli("validate", tmp_path / "bomb")
    assert done.returncode == 1 and "expands to more than 100,000 values" in done.stderr
    assert time.perf_counter() - started < 10  # (a bound for a hang, not a benchmark)


# ---------------------------------------------------------------- 9. one log line per client that leaves mid-upload

def test_clients_leaving_during_an_upload_log_one_line_each(tmp_path):
    d = write_truss(tmp_path / "e", "class Model:\n    def predict(self, x):\n        return x\n")
    with serve_ours(d) as s:
        port = int(s.url.rsplit(":", 1)[1])
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                             b"content-length: 1000\r\n\r\n{\"partial\": ")
            time.sleep(0.02)
        deadline = time.monotonic() + 30  # until the server has logged all 20 (a line too many fails below)
        while sum("disconnect" in line.lower() for line in s.log.splitlines()) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(s.predict_url(), json=1).json() == 1
    lines = [line for line in s.log.splitlines() if "disconnect" in line.lower()]
    assert len(lines) == 20 and "Traceback" not in s.log


# ---------------------------------------------------------------- 10. a data folder that contains the target

def test_data_dot_is_refused_before_copying_anything(tmp_path):
    nb = write_notebook(tmp_path / "nb.ipynb", [SIMPLE])
    done = cli("export", nb, tmp_path / "out", "--data", ".", cwd=tmp_path)
    assert done.returncode == 1 and "contains the export target" in done.stderr and len(done.stderr) < 500
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- 11. a reload while serving answers 503, never 500

def test_predicts_during_a_reload_of_a_served_model_get_503_not_500(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    port = free_port()
    k.ok("%load_ext kernel_magics\nimport time")
    k.ok("%%model\nclass Model:\n    def load(self):\n        time.sleep(0.05)\n"
         "    def predict(self, model_input):\n        return 'ok'")
    k.ok("%model_load --no-widget")
    k.ok(f"%model_serve --port {port}")
    statuses = []
    stop = []

    def hammer():
        with httpx.Client() as client:
            while not stop:
                statuses.append(client.post(f"http://127.0.0.1:{port}/v1/models/model:predict", json={}).status_code)

    import threading

    thread = threading.Thread(target=hammer)
    thread.start()
    for _ in range(15):
        k.ok("%model_load --no-widget")
    stop.append(1)
    thread.join()
    k.ok("%model_serve --stop")
    assert set(statuses) <= {200, 503} and 503 in statuses and statuses.count(200) > 10, set(statuses)


# ---------------------------------------------------------------- 12. every line once, everywhere

def test_logging_in_load_shows_once_without_jupyterlab_and_print_once_with_a_view(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)  # as nbconvert or a console: no widget frontend
    k.ok("%load_ext kernel_magics\nimport logging")
    k.ok("%%model\nclass Model:\n    def load(self):\n        logging.getLogger('mine').warning('weights are stale')\n"
         "        print('loading shards')\n    def predict(self, model_input):\n        return 1")
    ex = k.ok("%model_load")
    assert ex.stderr.count("weights are stale") == 1 and ex.stdout.count("loading shards") == 1
    k.ok("%config ModelMagics.widgets = 'always'")
    ex = k.ok("%model_load")
    views = [m["content"]["data"]["state"]["value"] for m in ex.messages if m["msg_type"] == "comm_msg"
             and "value" in m["content"]["data"].get("state", {})]
    assert "loading shards" not in ex.stdout  # in the view only, not also below it
    assert views[-1].count("loading shards") == 1


def test_model_secret_in_a_headless_run_uses_the_environment(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path, env={"TRUSS_SECRET_tok": CANARY})
    k.ok("%load_ext kernel_magics")
    k.ok("%%model_config\nsecrets: {tok: null}\n")
    ex = k.ok("%model_secret tok")
    assert "comes from the environment variable TRUSS_SECRET_tok" in ex.stdout and CANARY not in ex.all_text


def test_flags_are_declared_so_typos_are_errors(kernel):
    for line in ("%%predict --typo\n{}", "%model_load --backgroud", "%model_export out --forse"):
        ex = kernel.execute(line)
        assert ex.status == "error" and ex.reply["ename"] == "UsageError", ex.all_text
    ex = kernel.execute("%model_predict --typo {}")
    assert ex.reply["ename"] == "UsageError" and "Unknown option --typo" in ex.reply["evalue"]
    helps = json.dumps(kernel.ok("%model_predict?").reply["payload"])  # the pager shows the docstring
    assert "--header" in helps and "--method" in helps and "--no-widget" in helps


# ---------------------------------------------------------------- 13. an interrupt stops load(), and a retry starts at once

def _interrupt_when(k: Kernel, marker) -> None:
    """Interrupt the kernel once ``marker`` exists (from a thread: the cell is busy meanwhile)."""
    import threading

    def watch() -> None:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        k.interrupt()

    threading.Thread(target=watch, daemon=True).start()


def _run(k: Kernel, code: str, **kw):
    """Execute and fail on an error output. (The outputs, not the reply: the harness can pair a cell with
    the previous cell's reply, which matters right after a cell that failed.)"""
    ex = k.execute(code, **kw)
    assert ex.error is None, f"cell failed:\n{code}\n{ex.error_text}"
    return ex


def test_interrupting_model_load_stops_load_and_a_retry_does_not_wait_for_it(tmp_path, fresh_kernel):
    started = tmp_path / "started"
    k = fresh_kernel(cwd=tmp_path)
    _run(k, "%load_ext kernel_magics\nimport time, pathlib\nSLOW, STOPPED = True, []")
    _run(k, f"%%model\nclass Model:\n    def load(self):\n        pathlib.Path({str(started)!r}).write_text('x')\n"
         "        try:\n            while SLOW:\n                time.sleep(0.01)\n        finally:\n"
         "            STOPPED.append(1)\n    def predict(self, model_input):\n        return 'ok'")
    _interrupt_when(k, started)
    ex = k.execute("%model_load --no-widget", timeout=60)
    assert ex.error and ex.error["ename"] == "KeyboardInterrupt", ex.all_text
    assert "load() was stopped" in ex.stdout
    # load() really stopped (its finally ran before the interrupt was reported), and the state says so.
    assert _run(k, "print(STOPPED)").stdout.strip() == "[1]"
    assert "state: failed" in _run(k, "%model_status").stdout
    # With SLOW still True, a retry that waited for the old load would never return.
    started.unlink()
    _interrupt_when(k, started)
    assert k.execute("%model_load --no-widget", timeout=60).error["ename"] == "KeyboardInterrupt"
    _run(k, "SLOW = False")
    _run(k, "%model_load --no-widget")
    assert _run(k, "%model_predict {}").result == "'ok'"


# ---------------------------------------------------------------- 14. the export's check is bounded by its own work

HELPER_LOAD = '''%%model
class Model:
    def load(self):
        import subprocess, sys, threading, time
        # A helper that never exits: it inherits the check's stdout and stderr.
        self.helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pathlib.Path(PIDS).write_text(str(self.helper.pid))
        threading.Thread(target=time.sleep, args=(600,), name="forever").start()
    def predict(self, model_input):
        return "ok"
'''


def test_a_helper_that_load_leaves_running_does_not_hold_the_export(tmp_path, fresh_kernel):
    pids = tmp_path / "helper.pid"
    k = fresh_kernel(cwd=tmp_path)
    k.ok(f"%load_ext kernel_magics\nimport pathlib\nPIDS = {str(pids)!r}")
    k.ok(HELPER_LOAD)
    k.ok("%model_load --no-widget")
    kernel_helper = int(pids.read_text())
    assert k.ok("%model_predict {}").result == "'ok'"
    ex = k.ok("%model_export out", timeout=90)  # before: waited for the helper (30 minutes)
    assert "Replayed 1 recorded prediction" in ex.stdout
    warning = "\n".join(line for line in ex.stdout.splitlines() if line.startswith("warning:"))
    assert "thread `forever`" in warning and "time.sleep(600)" in warning and "stopped it" in warning
    checked_helper = int(pids.read_text())
    assert checked_helper != kernel_helper
    assert process_gone(checked_helper)  # the check's helper was stopped with the check
    assert not process_gone(kernel_helper, timeout=0)  # the kernel's own is the notebook's business
    k.ok("model = get_ipython().magics_manager.registry['ModelMagics']\nmodel.host.instance.helper.kill()")


# ---------------------------------------------------------------- 15. kill -9 during an export leaves nothing for long

BLOCKING_INIT = '''%%model
class Model:
    def __init__(self):
        import os, pathlib, time
        if os.environ.get("KM_BLOCK"):
            pathlib.Path(os.environ["KM_BLOCK"]).write_text(str(os.getpid()))
            time.sleep(600)
    def predict(self, model_input):
        return 1
'''


def test_kill_9_during_an_export_the_checker_dies_and_the_next_export_cleans_up(tmp_path):
    nb = write_notebook(tmp_path / "nb.ipynb", [BLOCKING_INIT])
    temp = tmp_path / "tmp"
    temp.mkdir()
    marker = tmp_path / "checker.pid"
    env = {**os.environ, "TMPDIR": str(temp)}
    command = [sys.executable, "-m", "kernel_magics", "export", str(nb), str(tmp_path / "out")]
    proc = subprocess.Popen(command, env={**env, "KM_BLOCK": str(marker)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    checker = int(marker.read_text())
    assert leftovers(tmp_path) and [p.name for p in temp.iterdir() if p.name.startswith("km-check-")]
    proc.kill()
    proc.wait()
    assert process_gone(checker)  # the checker died with its parent
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert leftovers(tmp_path) == [] and list(temp.iterdir()) == []


# ---------------------------------------------------------------- 16. bad input: one paragraph, never a traceback

def test_bad_input_in_the_magics_gets_a_one_paragraph_usage_error(tmp_path, request):
    k = Kernel(cwd=str(tmp_path))
    request.addfinalizer(k.shutdown)
    k.ok("%load_ext kernel_magics")
    k.ok(SIMPLE)
    cases = {
        "%model_export 'unterminated": "Close the quote",
        "%model_serve --port -1": "argument --port: '-1' is not a port number: give one from 0 to 65535",
        "%model_serve --port 70000": "argument --port: '70000' is not a port number: give one from 0 to 65535",
        "%model_export " + "n" * 300: "bytes long",
        "%%model_config\nmodel_metadata: &a [*a]\n": "would contain itself",
        "%%model_config\nmodel_metadata: {big: " + "9" * 5000 + "}\n": "integer of 5,000 digits",
        "%%model_config\nenvironment_variables: {A: [1, 2]}\n": "must be a single value",
        "%model_unload --all": "%model_unload takes no arguments",
        "%model_status --verbose": "%model_status takes no arguments",
        "%%model_config --reset\nmodel_name: x\n": "%%model_config takes no arguments",
    }
    held = socket.socket()  # a port something else listens on
    request.addfinalizer(held.close)
    held.bind(("127.0.0.1", 0))
    held.listen()
    busy = held.getsockname()[1]
    cases[f"%model_serve --port {busy}"] = f"Port {busy} on 127.0.0.1 is in use; pick another with --port."
    for code, fragment in cases.items():
        message = usage_error(k.execute(code))
        assert fragment in message and len(message) < 600, (code[:60], message)
    assert "state: defined" in k.ok("%model_status").stdout  # nothing changed on the way


BOMB = "%%model_config\nmodel_metadata:\n  a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"  {n}: &{n} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, n in zip("abcd", "bcde"))


def test_config_folders_a_data_symlink_loop_and_an_alias_bomb_get_one_line_from_the_cli(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "weights.bin").write_bytes(b"w")
    (project / "data" / "loop").symlink_to("../data")
    nb = write_notebook(project / "nb.ipynb", [SIMPLE])
    done = cli("export", nb, project / "out")
    assert done.returncode == 1 and len(done.stderr) < 600 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "is a symbolic link to a folder that contains it" in done.stderr
    (project / "data" / "loop").unlink()
    (tmp_path / "shared").mkdir()
    for data_dir, fragment in (("/", "is the root directory"), ('"~"', "is your home directory")):
        nb = write_notebook(project / "nb.ipynb", [f"%%model_config\ndata_dir: {data_dir}\n", SIMPLE])
        done = cli("export", nb, project / "out")
        assert done.returncode == 1 and fragment in done.stderr and len(done.stderr) < 600, done.stderr
    nb = write_notebook(project / "nb.ipynb", ["%%model_config\ndata_dir: ../shared\n", SIMPLE])
    done = cli("export", nb, project / "out")
    assert done.returncode == 0 and "warning: data_dir: '../shared' is outside the notebook's folder" in done.stderr
    # Aliases that expand to just under the node cap: refused at once, never written out expanded.
    nb = write_notebook(project / "nb.ipynb", [BOMB, SIMPLE])
    done = cli("export", nb, project / "bomb")
    assert done.returncode == 1 and "aliases (*name) add" in done.stderr, done.stderr
    assert not (project / "bomb").exists() and leftovers(project) == []
