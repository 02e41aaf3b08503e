"""Truss's own test directories, served by `kernel-magics serve` and by Truss 0.18.36's server in the same run.

Each directory comes from the truss package in the reference venv (truss/tests/test_data); the same
requests go to both servers, and status, media type, x-baseten-error-* headers and body must agree
(streams compared whole). Where model.py only sleeps a long time, a copy shortens the waits.

Left out, and why:
- test_custom_server_truss, test_env_vars, test_go_custom_server_truss: docker_server trusses (a
  custom image runs its own server: there is no model.py to serve).
- test_trt_llm_truss: needs the TRT-LLM extension and an A100 (its model gets the engine as a kwarg).
- test_truss_server_model_cache_v1/v2: download weights from the Hugging Face hub (no network here).
- test_requirements_file_truss: imports torch, which the reference venv does not have (its server
  could not load it here; ours serves it, see test_a_model_needing_torch_serves_here).
- test_streaming_truss_with_tracing: imports opentelemetry-sdk at module level and writes traces to
  /tmp; our venv does not install Truss's tracing stack.
- test_build_commands_failure: its build fails on purpose; a build that fails deploys nothing.
- context_builder_image_test, docker_server_start_command, patch_ping_test_server: not Truss model
  directories (no config.yaml with a model).
"""

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import TRUSS_VENV
from server_harness import serve_ours, serve_truss, truss_reference_python

JSON = {"content-type": "application/json"}
COMMON = [
    ("GET", "/", None, {}),
    ("GET", "/v1/models/model", None, {}),
    ("GET", "/v1/models/model/schema", None, {}),
    ("POST", "/v1/models/model:predict", b"{bad json", JSON),
    ("POST", "/v1/models/model:predict", b"", JSON),
]
PREDICT = ("POST", "/v1/models/model:predict")

# name -> (requests after the common ones, {pattern: replacement} applied to model.py, env)
CASES = {
    "annotated_types_truss": [(*PREDICT, b'{"prompt": "hi"}', JSON), (*PREDICT, b'{"nope": 1}', JSON),
                              (*PREDICT, b'{"prompt": 3}', JSON)],
    "gcs_fix": [(*PREDICT, b'{"a": [1, 2.5, null]}', JSON)],
    "server_conformance_test_truss": [(*PREDICT, b'{"x": 1}', JSON)],
    "test_async_truss": [(*PREDICT, b'{"a": 1}', JSON), (*PREDICT, b'[1]', JSON)],
    "test_basic_truss": [(*PREDICT, b'{"inputs": [[0]]}', JSON), (*PREDICT, b'"text"', JSON)],
    "test_build_commands": [(*PREDICT, b'{}', JSON)],
    "test_build_commands_truss": [(*PREDICT, b'{}', JSON)],
    "test_concurrency_truss": [(*PREDICT, b'{"c": 2}', JSON)],
    "test_non_root_base_image": [(*PREDICT, b'{}', JSON)],
    "test_openai": [(*PREDICT, b'{}', JSON), ("POST", "/v1/chat/completions", b'{}', JSON),
                    ("POST", "/v1/completions", b'{}', JSON), ("POST", "/v1/embeddings", b'{}', JSON),
                    ("POST", "/v1/messages", b'{}', JSON), ("POST", "/v1/responses", b'{}', JSON),
                    ("GET", "/v1/models/model/loaded", None, {}), ("GET", "/ping", None, {}),
                    ("POST", "/invocations", b'{}', JSON)],
    "test_pyantic_v1": [(*PREDICT, b'{}', JSON)],
    "test_pyantic_v2": [(*PREDICT, b'{}', JSON)],
    "test_streaming_async_generator_truss": [(*PREDICT, b'{}', JSON),
                                             (*PREDICT, b'{}', {**JSON, "accept": "application/json"})],
    "test_streaming_read_timeout": [(*PREDICT, b'{}', JSON)],
    "test_streaming_truss": [(*PREDICT, b'{}', JSON), (*PREDICT, b'{}', {**JSON, "accept": "application/json"})],
    "test_streaming_truss_with_error": [(*PREDICT, b'{}', JSON), (*PREDICT, b'{"throw_error": true}', JSON)],
    "test_system_managed_python": [(*PREDICT, b'{}', JSON)],
    "test_truss": [(*PREDICT, b'{"inputs": [[0]]}', JSON)],
    "test_truss_with_error": [(*PREDICT, b'{}', JSON)],
}
# Shorter waits, same behaviour: test_streaming_read_timeout still waits longer than its
# streaming_read_timeout (1 s) before the first chunk, so both servers cut the stream.
SLEEPS = {
    "server_conformance_test_truss": {r"time\.sleep\(20\)": "time.sleep(0.3)"},
    "test_concurrency_truss": {r"time\.sleep\(2\)": "time.sleep(0.2)"},
    "test_streaming_truss": {r"time\.sleep\(2\)": "time.sleep(0.1)"},
    "test_streaming_read_timeout": {r"time\.sleep\(2\)": "time.sleep(1.5)", r"time\.sleep\(3\)": "time.sleep(0.1)"},
}


def _test_data() -> Path:
    found = sorted(TRUSS_VENV.glob("lib/python3*/site-packages/truss/tests/test_data"))
    if not found or truss_reference_python() is None:
        pytest.skip("the truss reference venv is not set up (make test sets it up)")
    return found[0]


def _copy(name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name
    shutil.copytree(_test_data() / name, dest, ignore=shutil.ignore_patterns("__pycache__"))
    model = dest / "model" / "model.py"
    text = model.read_text()
    for pattern, replacement in SLEEPS.get(name, {}).items():
        text, n = re.subn(pattern, replacement, text)
        assert n, f"{name}: {pattern} not found: Truss's test data changed"
    model.write_text(text)
    # Several cases' configs have their servers trace to /tmp/otel_traces.ndjson, outside the run's temp dir (a
    # leftover on a machine that did not have it): the same file, in this test's folder.
    config = dest / "config.yaml"
    config.write_text(config.read_text().replace("/tmp/otel_traces.ndjson", str(tmp_path / "otel_traces.ndjson")))
    return dest


def _answer(base: str, method: str, path: str, body, headers) -> tuple:
    """Status, media type, error headers and body; a body cut off mid-stream is marked so."""
    with httpx.stream(method, base + path, content=body, headers=headers, timeout=30) as r:
        raw, complete = b"", True
        try:
            for chunk in r.iter_raw():
                raw += chunk
        except httpx.RemoteProtocolError:
            complete = False
        ctype = r.headers.get("content-type", "")
        payload = httpx.Response(200, content=raw).json() if ctype.startswith("application/json") and complete else raw
        return (r.status_code, ctype, r.headers.get("x-baseten-error-source"), r.headers.get("x-baseten-error-code"),
                payload, "complete" if complete else "cut off")


@pytest.mark.parametrize("name", sorted(CASES))
def test_truss_test_data_is_served_as_truss_serves_it(tmp_path, name):
    path = _copy(name, tmp_path)
    requests = COMMON + CASES[name]
    with serve_truss(path) as theirs:
        expected = [_answer(theirs.url, *req) for req in requests]
    with serve_ours(path) as ours:
        got = [_answer(ours.url, *req) for req in requests]
    for req, want, have in zip(requests, expected, got):
        assert have == want, f"{name} {req[:3]}: Truss answered {want}, we answered {have}"


def test_a_failed_load_ends_both_servers(tmp_path):
    """model_load_failure_test: load() raises; neither server ever becomes ready, both exit."""
    path = _copy("model_load_failure_test", tmp_path)
    for serve in (serve_truss, serve_ours):
        with serve(path, wait_ready=False) as served:
            code = served.proc.wait(timeout=60)
        assert code != 0 or serve is serve_truss, served.log  # Truss exits 0 after its shutdown
        assert "Raising exception in model load" in served.log


def test_secret_defaults_and_their_override(tmp_path):
    """test_basic_truss gives its secrets defaults in config.yaml: used, overridden by the environment."""
    path = _copy("test_basic_truss", tmp_path)
    (path / "model" / "model.py").write_text(
        "class Model:\n    def __init__(self, secrets, config):\n        self._s, self._c = secrets, config\n"
        "    def predict(self, model_input):\n"
        "        return {'foo': self._s['foo'], 'bar': self._s['bar'], 'config_secrets': self._c['secrets']}\n")
    for env in ({}, {"TRUSS_SECRET_foo": "from-env"}):
        with serve_truss(path, env=env) as theirs:
            want = httpx.post(theirs.url + "/v1/models/model:predict", json={}).json()
        with serve_ours(path, env=env) as ours:
            have = httpx.post(ours.url + "/v1/models/model:predict", json={}).json()
        assert have == want
        assert have["foo"] == env.get("TRUSS_SECRET_foo", "foo") and have["bar"] == "bar"
    assert "secret `foo` has a value in config.yaml; it is used as the default" in ours.log
    assert "unknown key" not in ours.log


def test_a_model_needing_torch_serves_here(tmp_path):
    """test_requirements_file_truss (left out above: the reference venv has no torch) serves with ours."""
    path = _copy("test_requirements_file_truss", tmp_path)
    with serve_ours(path) as ours:
        assert httpx.post(ours.url + "/v1/models/model:predict", json={}).json() is False  # no CUDA here


ODD = '''
import datetime
import numpy as np

LOOP = []
LOOP.append(LOOP)  # a list inside itself


class Model:
    def predict(self, model_input):
        return {
            "nan": {"v": float("nan"), "i": float("inf"), "n": -float("inf")},
            "set": {"s": {1, 2}},
            "datetime": {"t": datetime.datetime(2020, 1, 1)},
            "bytes": b"xy",
            "object": {"o": object()},
            "numpy": {"i": np.int64(3), "f": np.float32(1.5), "a": np.arange(3)},
            "tuple": (1, [2, 3]),
            "circular": {"c": LOOP},
            # Keys json.dumps writes for itself: NaN and the infinities by name, two keys that write alike twice.
            "keys": {float("nan"): 1, float("inf"): 2, 1: "int", "1": "str", None: "n", 1.5: "f",
                     np.float64(2.5): [0.5] * 20, "n": {False: 0, "false": 1}},
        }[model_input["kind"]]
'''


def test_odd_results_answer_as_truss_answers(tmp_path):
    """NaN and infinities pass; what json cannot encode gets Truss's status, body and headers."""
    from server_harness import write_truss

    _test_data()  # skips without the reference
    path = write_truss(tmp_path / "odd", ODD, "model_name: odd\nrequirements: [numpy]\n")
    kinds = ["nan", "set", "datetime", "bytes", "object", "numpy", "tuple", "keys", "circular"]
    requests = [(*PREDICT, json.dumps({"kind": k}).encode(), JSON) for k in kinds]
    from server_harness import truss_venv_with_models

    keys = {"kind": "keys"}
    with serve_truss(path, venv=truss_venv_with_models()) as theirs:
        expected = [_answer(theirs.url, *req) for req in requests]
        their_keys = httpx.post(theirs.url + "/v1/models/model:predict", json=keys).content
    with serve_ours(path) as ours:
        got = [_answer(ours.url, *req) for req in requests]
        our_keys = httpx.post(ours.url + "/v1/models/model:predict", json=keys).content
    assert our_keys == their_keys and their_keys.count(b'"1": ') == 2  # byte for byte, both keys that write alike
    for req, want, have in zip(requests, expected, got):
        assert have[:4] == want[:4] and have[5] == want[5], f"{req[2]}: Truss {want}, ours {have}"
        # NaN is not JSON: compare the bodies as text where they hold it.
        assert json.dumps(have[4], sort_keys=True) == json.dumps(want[4], sort_keys=True), req[2]
    assert expected[1][0] == 500 and expected[1][4] == {"error": "Unhandled exception: TypeError: Object of type set is not JSON serializable"}
    assert expected[-1][0] == 500 and expected[-1][4] == {"error": "Unhandled exception: ValueError: Circular reference detected"}
