"""Every magic in a real IPython kernel over jupyter_client: the happy paths and the bad input."""

import re
import textwrap

import pytest

from kernel_harness import Kernel


CANARY = "sk-CANARY-7f3a9d"


def model_cell(body: str) -> str:
    return "%%model\n" + textwrap.dedent(body).strip() + "\n"


SIMPLE = model_cell("""
    class Model:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
        def load(self):
            self.weights = [1.0, 2.0]
        def predict(self, model_input):
            return {"y": model_input["x"] * self.weights[1]}
""")


def define_and_load(kernel, cell: str, config: str = "model_name: t\n") -> None:
    kernel.ok("%%model_config\n" + config)
    kernel.ok(cell)
    kernel.ok("%model_load")


def assert_usage_error(ex, *fragments: str) -> None:
    assert ex.status == "error", ex.all_text
    assert ex.reply["ename"] == "UsageError", ex.error_text
    message = ex.reply["evalue"]
    for fragment in fragments:
        assert fragment in message, message
    # Shown as one line on stderr: no traceback at all.
    assert ex.error is None and ex.stderr.strip() == f"UsageError: {message}", ex.stderr


def test_extension_loads_from_ipython_config(tmp_path, fresh_kernel):
    profile = tmp_path / "profile_default"
    profile.mkdir()
    (profile / "ipython_config.py").write_text('c.InteractiveShellApp.extensions = ["kernel_magics"]\n')
    k = fresh_kernel(env={"IPYTHONDIR": str(tmp_path)})
    assert "state: not defined" in k.ok("%model_status").stdout


def test_load_ext_is_light(fresh_kernel):
    """A kernel of its own: in the module's shared kernel an earlier test may have imported anything."""
    k = fresh_kernel()
    heavy = "import sys; print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'ray') if m in sys.modules))"
    assert k.ok(heavy).stdout.strip() == "[]"  # else the kernel itself imports them and this test proves nothing
    k.ok("%load_ext kernel_magics")
    k.ok("%%model_config\nmodel_name: light\n")
    k.ok(SIMPLE)
    k.ok("%model_load")
    assert k.ok('%model_predict {"x": 1}').result == "{'y': 2.0}"
    assert k.ok(heavy).stdout.strip() == "[]"


def test_a_kernel_started_without_the_debugger_is_otherwise_the_kernel_ipykernel_starts(tmp_path):
    """kernel_magics/notebook/kernel_launcher.py (the tests' kernels, `export --execute`): no debugger in its
    kernel_info, but the notebook's own code can import debugpy, and the import path and sys.argv[0] are
    ipykernel_launcher's (the working directory first, as ''), so a module beside the notebook imports."""
    (tmp_path / "beside.py").write_text("X = 41\n")
    probe = "import sys, beside, debugpy\nprint(sys.path, sys.argv[0], beside.X + 1, debugpy.__name__)"
    shown = {}
    for debugger in (False, True):
        k = Kernel(cwd=str(tmp_path), debugger=debugger)
        k.kc.kernel_info()
        reply = k.kc.get_shell_msg(timeout=30)
        while reply["msg_type"] != "kernel_info_reply":
            reply = k.kc.get_shell_msg(timeout=30)
        assert ("debugger" in reply["content"]["supported_features"]) is debugger
        shown[debugger] = k.ok(probe).stdout
        k.shutdown()
    assert shown[False] == shown[True] and "'', " in shown[False] and "ipykernel_launcher.py 42 debugpy" in shown[False], \
        shown


# ---------------------------------------------------------------- %%model_config

def test_config_cell_and_line_show(kernel):
    ex = kernel.ok("%%model_config\nmodel_name: shown\nrequirements: [torch]\nsecrets: {tok: null}\n")
    assert "Config set for shown" in ex.stdout and "tok (not set)" in ex.stdout
    shown = kernel.ok("%model_config")
    assert "model_name: shown" in shown.all_text and "tok: null" in shown.all_text


@pytest.mark.parametrize("yaml_text, fragments", [
    ("model_name: [a\n", ["%%model_config cell, line 3, column 1: YAML syntax error"]),
    ("model_name: a\nmodel_clas_name: B\n", ["line 3: unknown key `model_clas_name`", "Did you mean `model_class_name`?"]),
    ("requirements: torch\n", ["line 2: `requirements` must be a list, not str"]),
    ("secrets: {tok: " + CANARY + "}\n", ["secret `tok` has a value", "TRUSS_SECRET_tok"]),
])
def test_bad_config_is_one_clear_line_and_keeps_the_previous(kernel, yaml_text, fragments):
    kernel.ok("%%model_config\nmodel_name: before\n")
    ex = kernel.execute("%%model_config\n" + yaml_text)
    assert_usage_error(ex, *fragments, "The previous config stays in effect.")
    assert CANARY not in ex.all_text
    assert "model_name: before" in kernel.ok("%model_config").all_text


# ---------------------------------------------------------------- %%model

def test_model_definition_errors_keep_the_previous_model(kernel):
    define_and_load(kernel, SIMPLE)
    cases = [
        (model_cell("class Model:\n    def predict(self, x)\n        return x"),
         ["Syntax error in the %%model cell, line 3", "expected ':'"]),
        (model_cell("class Other:\n    def predict(self, x):\n        return x"),
         ["defines no class named `Model`", "It defines: Other", "model_class_name"]),
        (model_cell("class Model:\n    def load(self):\n        pass"), ["has no `predict` method"]),
        (model_cell("class Model:\n    def load(self, path):\n        pass\n    def predict(self, x):\n        return x"),
         ["`Model.load` must take no arguments besides self", "load(self, path)"]),
    ]
    for cell, fragments in cases:
        ex = kernel.execute(cell)
        assert_usage_error(ex, *fragments, "The previous model stays active.")
        assert kernel.ok('%model_predict {"x": 2}').result == "{'y': 4.0}"
    # The notebook's name `Model` still refers to the working class.
    assert kernel.ok("Model.__name__, hasattr(Model, 'predict')").result == "('Model', True)"


def test_error_while_defining_shows_the_users_line(kernel):
    define_and_load(kernel, SIMPLE)
    ex = kernel.execute("%%model\nclass Model:\n    x = undefined_name\n    def predict(self, i):\n        return i\n")
    assert ex.status == "error" and ex.error["ename"] == "NameError"
    assert re.search(r"Cell In\[\d+\], line 3", ex.error_text)
    assert "The previous model stays active." in ex.error_text
    assert kernel.ok('%model_predict {"x": 1}').result == "{'y': 2.0}"


# ---------------------------------------------------------------- %model_load

def test_load_passes_truss_kwargs_and_reports_device(kernel):
    define_and_load(kernel, SIMPLE, "model_name: kw\nsecrets: {tok: null}\n")
    ex = kernel.ok("%model_load --device cpu")
    assert "Ready in" in ex.stdout and "on cpu" in ex.stdout
    got = kernel.ok("m = _km = get_ipython().magics_manager.registry['ModelMagics'].host.instance\n"
                    "sorted(m.kwargs), m.kwargs['config']['model_name'], type(m.kwargs['data_dir']).__name__")
    assert got.result == "(['config', 'data_dir', 'environment', 'secrets'], 'kw', 'PosixPath')"


def test_load_bad_device_is_a_usage_error(kernel):
    kernel.ok(SIMPLE)
    assert_usage_error(kernel.execute("%model_load --device tpu"), "Unknown device 'tpu'")


def test_failing_load_leaves_state_failed_and_kernel_usable(kernel):
    kernel.ok(model_cell("""
        class Model:
            def load(self):
                raise RuntimeError("checkpoint not found")
            def predict(self, x):
                return x
    """))
    ex = kernel.execute("%model_load")
    assert ex.status == "error" and ex.error["ename"] == "RuntimeError"
    assert "checkpoint not found" in ex.error_text and "kernel_magics" not in ex.error_text
    assert re.search(r"Cell In\[\d+\], line 4", ex.error_text)
    status = kernel.ok("%model_status").stdout
    assert "state: failed" in status and "checkpoint not found" in status
    assert kernel.ok("1 + 1").result == "2"
    assert_usage_error(kernel.execute("%model_predict {}"), "last load failed")


def test_predict_before_load_says_what_to_run(kernel):
    kernel.ok(SIMPLE)
    kernel.ok("%model_unload")
    assert_usage_error(kernel.execute('%model_predict {"x": 1}'), "not loaded: run %model_load")


# ---------------------------------------------------------------- %model_predict and %%predict

def test_predict_input_forms_and_results(kernel):
    define_and_load(kernel, SIMPLE)
    assert kernel.ok('%model_predict {"x": 3}').result == "{'y': 6.0}"
    kernel.ok("inp = {'x': 5}")
    assert kernel.ok("%model_predict inp").result == "{'y': 10.0}"
    assert kernel.ok("_").result == "{'y': 10.0}"
    assert kernel.ok('r = %model_predict {"x": 1}\nr["y"]').result == "2.0"
    assert kernel.ok("%%predict\nv = 7\n{'x': v}").result == "{'y': 14.0}"


def test_bad_predict_inputs(kernel):
    define_and_load(kernel, SIMPLE)
    assert_usage_error(kernel.execute("%model_predict {not json"), "not JSON", "not a Python expression")
    assert_usage_error(kernel.execute("%model_predict"), "Usage: %model_predict [--no-widget] [--header NAME:VALUE]")
    assert_usage_error(kernel.execute("%%predict\nx = 1"), "last line of a %%predict cell must be an expression")


def test_a_streaming_predict_with_postprocess_is_warned_of_when_defined(kernel):
    defined = kernel.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        yield 'a'\n"
                        "    def postprocess(self, result):\n        return result").stdout
    assert "warning: `Model.predict` streams (it yields), and Truss cannot postprocess a stream" in defined, defined


def test_a_missing_or_unknown_argument_is_shown_with_the_magics_usage(kernel):
    """argparse's own words alone ("the following arguments are required: dir") left a new user guessing."""
    assert_usage_error(kernel.execute("%model_export"),
                       "the following arguments are required: dir. Usage: %model_export [--force] [--data PATH] "
                       "[--no-replay] dir (%model_export? says more).")
    assert_usage_error(kernel.execute("%model_show --whyy"),
                       "unrecognized arguments: --whyy (did you mean --why?). Usage: %model_show [--why] "
                       "[{model.py,config.yaml}]")
    assert_usage_error(kernel.execute("%model_export out --forse --no-replai"),
                       "unrecognized arguments: --forse --no-replai (did you mean --force or --no-replay?). Usage:")


PREDICT_STYLES = {
    "sync": ("def predict(self, model_input):\n        return model_input['n'] + 1", "2"),
    "async": ("async def predict(self, model_input):\n        await asyncio.sleep(0.01)\n"
              "        return model_input['n'] + 1", "2"),
    "generator": ("def predict(self, model_input):\n        for c in 'abc':\n            yield c", "'abc'"),
    "async generator": ("async def predict(self, model_input):\n        for i in range(3):\n"
                        "            await asyncio.sleep(0)\n            yield {'i': i}",
                        "[{'i': 0}, {'i': 1}, {'i': 2}]"),
    "pre/postprocess": ("async def preprocess(self, model_input):\n        return model_input['n'] * 10\n"
                        "    def predict(self, n):\n        return n + 1\n"
                        "    def postprocess(self, out):\n        return {'out': out}", "{'out': 11}"),
}


@pytest.mark.parametrize("style", list(PREDICT_STYLES))
def test_predict_styles(kernel, style):
    body, expected = PREDICT_STYLES[style]
    kernel.ok("import asyncio")
    define_and_load(kernel, f"%%model\nclass Model:\n    {body}\n")
    ex = kernel.ok('%model_predict {"n": 1}')
    if "generator" in style:
        # A stream shows as it arrives, once: no Out[n] repeating it; `_` and assignment still get the value.
        assert ex.result is None and "[done: 3 chunks" in ex.stdout
        assert kernel.ok("_").result == expected
        assert kernel.ok('r = %model_predict {"n": 1}\nr').result == expected
        assert kernel.ok('%model_predict {"n": 1};').result is None  # `;` hides, as in any cell
    else:
        assert ex.result == expected
        assert kernel.ok('%model_predict {"n": 1};').result is None


def test_pydantic_input_and_output(kernel):
    kernel.ok("import pydantic\nclass Prompt(pydantic.BaseModel):\n    prompt: str\n    n: int = 2\n"
              "class Out(pydantic.BaseModel):\n    text: str")
    define_and_load(kernel, model_cell("""
        class Model:
            def predict(self, model_input: Prompt) -> Out:
                return Out(text=model_input.prompt * model_input.n)
    """))
    assert kernel.ok('%model_predict {"prompt": "ab"}').result == "{'text': 'abab'}"
    assert_usage_error(kernel.execute('%model_predict {"n": 1}'), "does not match Prompt", "`prompt`: Field required")


def test_non_json_output_is_an_error_naming_type_and_place(kernel):
    define_and_load(kernel, model_cell("""
        class Model:
            def predict(self, model_input):
                return {"ok": 1, "bad": {1, 2}}
    """))
    assert_usage_error(kernel.execute("%model_predict {}"), "contains a set", "['bad']", "could not send it")


def test_user_exception_shows_only_user_frames(kernel):
    kernel.ok("def helper(v):\n    return 1 / v")
    define_and_load(kernel, model_cell("""
        class Model:
            def predict(self, model_input):
                return helper(model_input["v"])
    """))
    ex = kernel.execute('%model_predict {"v": 0}')
    assert ex.status == "error" and ex.error["ename"] == "ZeroDivisionError"
    text = ex.error_text
    assert "kernel_magics" not in text and "asyncio" not in text and "concurrent" not in text
    assert re.search(r"Cell In\[\d+\], line 4, in (Model\.)?predict", text)  # (the class name: Python 3.11+)
    assert re.search(r"Cell In\[\d+\], line 2, in helper", text)
    assert kernel.ok('%model_predict {"v": 4}').result == "0.25"


def test_print_in_predict_reaches_the_cell(kernel):
    define_and_load(kernel, model_cell("""
        class Model:
            def predict(self, model_input):
                print("hello from predict")
                return 1
    """))
    assert "hello from predict" in kernel.ok("%model_predict {}").stdout


# ---------------------------------------------------------------- unload, status

def test_unload_and_status(kernel):
    define_and_load(kernel, SIMPLE)
    kernel.ok('%model_predict {"x": 1}')
    status = kernel.ok("%model_status").stdout
    assert "class: Model" in status and "state: ready" in status and "device: cpu" in status
    assert re.search(r"load time: \d+\.\d+ s", status) and re.search(r"last predict: \d+\.\d+ ms", status)
    assert "Model unloaded" in kernel.ok("%model_unload").stdout
    assert "state: defined" in kernel.ok("%model_status").stdout
    kernel.execute("1 / 0")  # an error of another cell, which IPython keeps (and the next unload frees)
    assert kernel.ok("%model_unload").stdout.strip() == "No model was loaded."


# ---------------------------------------------------------------- hot reload

def test_hot_reload_keeps_loaded_objects_and_changes_behaviour(kernel):
    define_and_load(kernel, SIMPLE)
    before = kernel.ok("_h = get_ipython().magics_manager.registry['ModelMagics'].host\n"
                       "id(_h.instance), id(_h.instance.weights)").result
    ex = kernel.ok(SIMPLE.replace('{"y": model_input["x"] * self.weights[1]}', '{"z": model_input["x"] + 100}'))
    assert "Hot-swapped `Model`" in ex.stdout and "changed" not in ex.stdout
    after = kernel.ok("id(_h.instance), id(_h.instance.weights)").result
    assert before == after
    assert kernel.ok('%model_predict {"x": 1}').result == "{'z': 101}"


def test_hot_reload_says_when_load_changed_and_reload_applies_it(kernel):
    define_and_load(kernel, SIMPLE)
    ex = kernel.ok(SIMPLE.replace("[1.0, 2.0]", "[1.0, 3.0]"))
    assert "`load` changed" in ex.stdout and "%model_load" in ex.stdout
    assert kernel.ok('%model_predict {"x": 1}').result == "{'y': 2.0}"
    kernel.ok("%model_load")
    assert kernel.ok('%model_predict {"x": 1}').result == "{'y': 3.0}"


# ---------------------------------------------------------------- secrets

SECRET_MODEL = model_cell("""
    class Model:
        def __init__(self, secrets):
            self._secrets = secrets
        def load(self):
            self.token = self._secrets["tok"]
        def predict(self, model_input):
            return {"token_length": len(self.token)}
""")


def test_secret_from_environment_never_reaches_output(fresh_kernel):
    k = fresh_kernel(env={"TRUSS_SECRET_tok": CANARY})
    k.ok("%load_ext kernel_magics")
    outputs = [
        k.ok("%%model_config\nmodel_name: s\nsecrets: {tok: null}\n"),
        k.ok(SECRET_MODEL),
        k.ok("%model_load"),
        k.ok("%model_predict {}"),
        k.ok("%model_status"),
        k.ok("%model_config"),
        k.ok("_h = get_ipython().magics_manager.registry['ModelMagics'].host\n_h.secrets"),
    ]
    assert outputs[3].result == f"{{'token_length': {len(CANARY)}}}"
    assert "tok: set" in outputs[-1].result
    for ex in outputs:
        assert CANARY not in ex.all_text


def test_missing_secret_names_the_variable_and_model_secret_prompts(kernel):
    kernel.ok("%%model_config\nmodel_name: s\nsecrets: {tok: null}\n")
    kernel.ok(SECRET_MODEL)
    # A missing secret is the user's set-up, not their code: one line saying how to provide it.
    assert_usage_error(kernel.execute("%model_load"), "Secret 'tok' has no value",
                       "TRUSS_SECRET_tok", "%model_secret tok")
    assert "state: failed" in kernel.ok("%model_status").stdout
    prompts = []
    ex = kernel.ok("%model_secret tok", stdin=lambda req: prompts.append(req) or CANARY)
    assert prompts and prompts[0]["password"] is True and "tok" in prompts[0]["prompt"]
    load = kernel.ok("%model_load")
    assert kernel.ok("%model_predict {}").result == f"{{'token_length': {len(CANARY)}}}"
    for out in (ex, load):
        assert CANARY not in out.all_text
    assert_usage_error(kernel.execute("%model_secret undeclared"), "not declared in the config")


def test_a_served_models_error_names_the_notebooks_cells_as_ipythons_tracebacks_do(kernel):
    """What `%model_serve` and the stream views log is `host.format_error`: a new user read a served error's
    traceback as `File "/tmp/ipykernel_123/456.py"`, where IPython's own say `Cell In[2]`."""
    kernel.ok("def failing_helper(x):\n    return 1 / x")
    text = kernel.ok("host = get_ipython().magics_manager.registry['ModelMagics'].host\ntry:\n    failing_helper(0)\n"
                     "except ZeroDivisionError as e:\n    print(host.format_error(e))").stdout
    assert re.search(r"  Cell In\[\d+\], line 2, in failing_helper\n    return 1 / x", text), text
    assert "ipykernel_" not in text and "ZeroDivisionError: division by zero" in text, text


# ---------------------------------------------------------------- tab completion

def test_tab_completes_the_options_of_the_magics_not_python_names(fresh_kernel, tmp_path):
    """Jedi completed `%model_export --f` as the expression `- -f` (`--filter`, `--float`): the magics' own
    options answer instead, the choices of an option or a positional argument, and files where a path goes;
    elsewhere (an input) IPython's completers answer as before. Once, after %reload_ext too."""
    kernel = fresh_kernel(cwd=tmp_path, load_ext=True)

    def matches(code: str) -> list[str]:
        kernel.kc.complete(code, len(code))
        reply = kernel.kc.get_shell_msg(timeout=30)
        return reply["content"]["matches"]

    assert matches("%model_export --f") == ["--force"]
    assert matches("%model_export --") == ["--data", "--force", "--no-replay"]
    assert matches("%model_serve --engine ") == ["kernel", "ray"]
    assert matches("%model_show ") == ["config.yaml", "model.py"]
    assert matches("%model_show --why c") == ["config.yaml"]
    # A path (the directory, --data): IPython's file completions alone; Jedi put Python names first.
    (tmp_path / "outdir_for_tab").mkdir()
    kernel.ok("outdated_name = 1")
    assert matches("%model_export ./outd") == ["./outdir_for_tab/"]  # (was also "./outdated_name")
    assert matches("%model_export --force outd") == ["outdir_for_tab/"]
    assert matches("%model_export out --data outd") == ["outdir_for_tab/"]
    assert "--header" not in matches('%model_predict {"x": -np.')  # an input: IPython's own completions
    assert "abs" in matches("%model_export --ab")  # no option of ours: IPython's answer is not hidden
    kernel.ok("%reload_ext kernel_magics")
    assert matches("%model_export --no") == ["--no-replay"]
