"""The whole Truss 0.18 model contract: request arguments, health, OpenAI-style methods, the other routes.

Differential: the same models served by `kernel-magics serve` and by Truss's own server in one run, the
same requests, equal status, media type, x-baseten-error-* headers and bodies (streams whole). The same
models in a real kernel answer the same through %model_predict.
"""

import json

import httpx
import pytest

from server_harness import answer, serve_ours, serve_truss, truss_reference_python, write_truss

REQUESTS = '''
import fastapi


class Model:
    def preprocess(self, model_input, request: fastapi.Request):
        return {**model_input, "user": request.headers.get("x-user")}

    async def predict(self, model_input, request: fastapi.Request):
        return {"got": model_input, "path": request.url.path, "gone": await request.is_disconnected()}

    def postprocess(self, output, request: fastapi.Request):
        return {**output, "method": request.method}
'''

REQUEST_ONLY = '''
import fastapi


class Model:
    async def predict(self, request: fastapi.Request):
        body = await request.json()
        return {"body": body, "type": request.headers.get("content-type"), "user": request.headers.get("x-user")}
'''

NO_ARGUMENT = '''
class Model:
    def predict(self):
        return "nothing asked"
'''

HEALTH = '''
import os
from pathlib import Path

FLAG = Path(os.environ["KM_HEALTH"])


class Model:
    def is_healthy(self):
        state = FLAG.read_text()
        if state == "raise":
            raise RuntimeError("health check exploded")
        return state == "ok"

    def predict(self, model_input):
        return "answered"
'''

OPENAI = '''
import json


class Model:
    def predict(self, model_input):
        return {"predict": model_input}

    def chat_completions(self, model_input):
        words = model_input["messages"][-1]["content"].split()
        if model_input.get("stream"):
            def stream():
                for word in words:
                    yield "data: " + json.dumps({"choices": [{"delta": {"content": word + " "}}]}) + "\\n\\n"
                yield "data: [DONE]\\n\\n"
            return stream()
        return {"choices": [{"message": {"role": "assistant", "content": " ".join(reversed(words))}}]}

    async def completions(self, model_input):
        return {"choices": [{"text": model_input["prompt"].upper()}]}
'''

JSON = {"content-type": "application/json"}
CASES = {
    "input and request": (REQUESTS, [
        ("POST", "/v1/models/model:predict", b'{"a": 1}', {**JSON, "x-user": "alice"}),
        ("POST", "/v1/models/model:predict", b'{bad', JSON),
        ("POST", "/invocations", b'{"b": 2}', {**JSON, "x-user": "bob"}),
    ]),
    "request only": (REQUEST_ONLY, [
        ("POST", "/v1/models/model:predict", b'{"free": ["form"]}', {**JSON, "x-user": "carol"}),
    ]),
    "no argument": (NO_ARGUMENT, [("POST", "/v1/models/model:predict", b'{"ignored": true}', JSON)]),
    "openai methods": (OPENAI, [
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "one two three"}]}', JSON),
        ("POST", "/v1/chat/completions",
         b'{"stream": true, "messages": [{"role": "user", "content": "one two"}]}', JSON),
        ("POST", "/v1/completions", b'{"prompt": "shout"}', JSON),
        ("POST", "/v1/embeddings", b'{"input": "x"}', JSON),
        ("POST", "/v1/messages", b'{}', JSON),
        ("POST", "/v1/responses", b'{bad', JSON),
        ("POST", "/v1/models/model:predict", b'{"p": 1}', JSON),
    ]),
    "other routes": (NO_ARGUMENT, [
        ("GET", "/v1/models/model/loaded", None, {}),
        ("GET", "/v1/models/anything/loaded", None, {}),
        ("GET", "/ping", None, {}),
        ("POST", "/invocations", b'{}', JSON),
    ]),
}


def _needs_truss():
    if truss_reference_python() is None:
        pytest.skip("the truss reference server is not set up (make test sets it up)")


@pytest.mark.parametrize("case", list(CASES))
def test_the_contract_answers_as_truss_does(tmp_path, case):
    _needs_truss()
    model, requests = CASES[case]
    path = write_truss(tmp_path / "m", model, "model_name: contract\n")
    with serve_truss(path) as theirs:
        expected = [answer(theirs.url, *req) for req in requests]
    with serve_ours(path) as ours:
        got = [answer(ours.url, *req) for req in requests]
    for req, want, have in zip(requests, expected, got):
        assert have == want, f"{req[:3]}: Truss answered {want}, we answered {have}"


def test_health_answers_as_truss_does(tmp_path):
    _needs_truss()
    flag = tmp_path / "health"
    path = write_truss(tmp_path / "h", HEALTH, f"environment_variables: {{KM_HEALTH: '{flag}'}}\n")
    flag.write_text("ok")
    answers = {}
    for name, serve in (("truss", serve_truss), ("ours", serve_ours)):
        flag.write_text("ok")
        with serve(path) as served:
            rows = []
            for state in ("ok", "no", "raise", "ok"):
                flag.write_text(state)
                rows.append((state, answer(served.url, "GET", "/v1/models/model", None, {}),
                             answer(served.url, "GET", "/v1/models/model/loaded", None, {})[0],
                             answer(served.url, "POST", "/v1/models/model:predict", b"{}", JSON)[0]))
            answers[name] = rows
    assert answers["ours"] == answers["truss"]
    assert [row[1][0] for row in answers["ours"]] == [200, 503, 503, 200]


def test_forms_truss_refuses_are_refused(tmp_path):
    from kernel_magics.core.contract import ModelContract
    from kernel_magics.core.errors import ModelDefinitionError

    import fastapi

    class RequestFirst:
        def predict(self, request: fastapi.Request, model_input):
            return 1

    class Unannotated:
        def predict(self, model_input, request):
            return 1

    class RequestOnlyWithPreprocess:
        def preprocess(self, model_input):
            return model_input

        def predict(self, request: fastapi.Request):
            return 1

    for cls, fragment in [(RequestFirst, "the request must be second"), (Unannotated, "annotated as one"),
                          (RequestOnlyWithPreprocess, "cannot take only the request")]:
        with pytest.raises(ModelDefinitionError, match=fragment):
            ModelContract.inspect(cls)


def test_metrics_count_requests_and_latency_per_route(tmp_path):
    path = write_truss(tmp_path / "m", NO_ARGUMENT)
    with serve_ours(path) as ours:
        for _ in range(3):
            httpx.post(ours.predict_url(), json={})
        httpx.get(ours.url + "/v1/models/model")
        metrics = httpx.get(ours.url + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'kernel_magics_requests_total{route="/v1/models/{model_name}:predict",status="200"} 3.0' in text
    assert 'kernel_magics_request_seconds_bucket{le="0.005",route="/v1/models/{model_name}:predict"}' in text


def test_the_notebook_answers_the_same(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics")
    k.ok("%%model\n" + REQUESTS)
    k.ok("%model_load")
    k.ok("import json")
    assert json.loads(k.ok('r = %model_predict --header x-user:alice {"a": 1}\nprint(json.dumps(r))')
                      .stdout) == {"got": {"a": 1, "user": "alice"}, "path": "/v1/models/model:predict",
                                   "gone": False, "method": "POST"}
    k.ok("%%model\n" + REQUEST_ONLY)
    k.ok("%model_load")
    got = k.ok('r = %model_predict --header x-user:carol {"free": ["form"]}\nprint(json.dumps(r))').stdout
    assert json.loads(got) == {"body": {"free": ["form"]}, "type": "application/json", "user": "carol"}
    k.ok("%%model\n" + OPENAI)
    k.ok("%model_load")
    ex = k.ok('%model_predict --method chat_completions {"messages": [{"role": "user", "content": "one two"}]}')
    assert ex.result == "{'choices': [{'message': {'role': 'assistant', 'content': 'two one'}}]}"
    ex = k.ok('%model_predict --method chat_completions --no-widget '
              '{"stream": true, "messages": [{"role": "user", "content": "one two"}]}')
    assert 'data: {"choices": [{"delta": {"content": "one "}}]}' in ex.stdout and "[done: 3 chunks" in ex.stdout
    ex = k.execute('%model_predict --method embeddings {"input": "x"}')
    assert ex.reply["ename"] == "UsageError" and "no `embeddings` method" in ex.reply["evalue"]
    k.ok("%%model\n" + HEALTH.replace('os.environ["KM_HEALTH"]', repr(str(tmp_path / "flag"))))
    (tmp_path / "flag").write_text("no")
    k.ok("%model_load")
    assert "state: unhealthy" in k.ok("%model_status").stdout
    (tmp_path / "flag").write_text("ok")
    assert "state: ready" in k.ok("%model_status").stdout
