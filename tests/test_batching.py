"""Dynamic batching (issue 24): the batcher itself, the runtime's batched predict, the config section,
our server and Truss's own server running an export that batches."""

import ast
import asyncio
import json
import re
import threading

import httpx
import pytest

from kernel_magics.core.batching import Batcher, BatchResultError, batched
from kernel_magics.core.config import parse_config
from kernel_magics.core.contract import ModelContract
from kernel_magics.core.errors import ConfigError, ModelDefinitionError
from kernel_magics.core.runtime import ModelHost
from server_harness import post_concurrently, serve_ours, serve_truss
from test_export import files_of, run_notebook_cells, write_notebook


def exported(model_class, max_batch_size, max_wait_ms):
    """``model_class`` as an export's model.py ends it (core/export.py batching_tail): a same-named subclass whose
    predict, made by ``batched``, feeds predict_batch."""
    class Exported(model_class):
        @batched(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
        async def predict(self, model_input):
            """Fed to predict_batch."""

    Exported.__name__ = Exported.__qualname__ = model_class.__name__
    return Exported


class Recorder:
    """A batch function that records each batch's inputs. ``held``: each batch announces itself on
    ``entered`` (a queue) and waits for a ``release()``; ``fail``: inputs answered with an exception."""

    def __init__(self, held=False, fail=()):
        self.batches = []
        self.held, self.fail = held, set(fail)
        self.entered = asyncio.Queue() if held else None
        self._releases = asyncio.Queue() if held else None

    def release(self):
        self._releases.put_nowait(None)

    async def __call__(self, inputs):
        self.batches.append(list(inputs))
        if self.held:
            self.entered.put_nowait(list(inputs))
            await self._releases.get()
        return [ValueError(f"bad {x}") if x in self.fail else x * 10 for x in inputs]


# ---------------------------------------------------------------- the batcher, no model, no server

def test_order_and_one_to_one_under_concurrency():
    async def main():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_size=8, max_wait_s=0.05)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(100)))
        return recorder.batches, results

    batches, results = asyncio.run(main())
    assert results == [i * 10 for i in range(100)]
    assert [x for b in batches for x in b] == list(range(100))  # each input once, in arrival order
    assert max(len(b) for b in batches) == 8 and len(batches) >= 100 // 8


def test_requests_arriving_while_a_batch_runs_form_the_next_batch():
    async def main():
        recorder = Recorder(held=True)
        batcher = Batcher(recorder, max_batch_size=32, max_wait_s=10)
        first = asyncio.ensure_future(batcher.submit(0))
        await recorder.entered.get()  # the lone first request went at once: nothing waited 10 s
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0)
        recorder.release()
        assert await first == 0
        await recorder.entered.get()
        recorder.release()
        return recorder.batches, await asyncio.gather(*rest)

    batches, rest = asyncio.run(main())
    assert batches == [[0], [1, 2, 3, 4, 5]]
    assert rest == [10, 20, 30, 40, 50]


def test_a_batch_is_cut_at_max_batch_size():
    async def main():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_size=4, max_wait_s=0.05)
        await batcher.submit(-1)  # an idle start: a batch of one
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        return recorder.batches, results

    batches, results = asyncio.run(main())
    assert batches == [[-1], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert results == [i * 10 for i in range(10)]


def test_the_wait_bound_a_batch_does_not_wait_for_requests_after_max_wait():
    """Under load (the last batch held 3) a batch waits for company, but only max_wait: a request that
    arrives after the first one's batch has started goes into the next batch."""
    async def main():
        recorder = Recorder(held=True)
        batcher = Batcher(recorder, max_batch_size=32, max_wait_s=0.05)
        first = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
        await recorder.entered.get()
        recorder.release()
        await asyncio.gather(*first)
        alone = asyncio.ensure_future(batcher.submit(100))
        await recorder.entered.get()  # its batch started with it alone, after at most max_wait
        later = asyncio.ensure_future(batcher.submit(200))
        recorder.release()
        await recorder.entered.get()
        recorder.release()
        return recorder.batches, await alone, await later

    batches, alone, later = asyncio.run(main())
    assert batches[0] == [0, 1, 2]
    assert batches[1:] == [[100], [200]]
    assert (alone, later) == (1000, 2000)


def test_a_batch_under_load_waits_for_the_requests_that_arrive_within_max_wait():
    async def main():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_size=32, max_wait_s=30)
        await asyncio.gather(*(batcher.submit(i) for i in range(3)))
        first = asyncio.ensure_future(batcher.submit(10))
        await asyncio.sleep(0)  # the worker is waiting for the batch to fill (3, as the last one)
        second = asyncio.ensure_future(batcher.submit(11))
        await asyncio.sleep(0)
        third = asyncio.ensure_future(batcher.submit(12))
        return recorder.batches, await asyncio.gather(first, second, third)

    batches, results = asyncio.run(main())
    assert batches == [[0, 1, 2], [10, 11, 12]]  # filled to 3 long before the 30 s wait
    assert results == [100, 110, 120]


def test_requests_queued_behind_a_running_batch_still_wait_for_the_wave_its_answers_release():
    """Under load, a request that queued while a batch ran has waited longer than max_wait, but not for company:
    the next batch waits up to max_wait after the batcher is free for the callers the answers released."""
    async def main():
        recorder = Recorder(held=True)
        batcher = Batcher(recorder, max_batch_size=32, max_wait_s=0.05)
        wave = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
        await recorder.entered.get()
        recorder.release()
        await asyncio.gather(*wave)  # the last batch held 3: the load is 3
        wave = [asyncio.ensure_future(batcher.submit(i)) for i in (10, 11, 12)]
        await recorder.entered.get()  # [10, 11, 12] runs at once (as many as the last batch), held
        queued = [asyncio.ensure_future(batcher.submit(13))]
        await asyncio.sleep(0.1)  # it waits behind the batch, longer than max_wait
        recorder.release()
        await asyncio.gather(*wave)  # their callers come back at once with their next requests
        queued += [asyncio.ensure_future(batcher.submit(i)) for i in (14, 15)]
        for _ in queued:  # enough for every batch these could form
            recorder.release()
        return recorder.batches, await asyncio.gather(*queued)

    batches, results = asyncio.run(asyncio.wait_for(main(), 30))
    assert batches[1:] == [[10, 11, 12], [13, 14, 15]]
    assert results == [130, 140, 150]


def test_a_failing_input_fails_only_its_own_request():
    async def main():
        batcher = Batcher(Recorder(fail={2}), max_batch_size=8, max_wait_s=0.05)
        return await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)

    results = asyncio.run(main())
    assert [r for i, r in enumerate(results) if i != 2] == [0, 10, 30, 40]
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad 2"


def test_a_raising_batch_fails_every_request_and_the_next_batch_runs():
    calls = []

    async def run(inputs):
        calls.append(list(inputs))
        if len(calls) == 1:
            raise RuntimeError("model broke")
        return inputs

    async def main():
        batcher = Batcher(run, max_batch_size=8, max_wait_s=0.05)
        failed = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        return failed, await batcher.submit(7)

    failed, after = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and str(r) == "model broke" for r in failed)
    assert after == 7


@pytest.mark.parametrize("bad", [lambda xs: xs[:-1], lambda xs: None, lambda xs: {"a": 1}])
def test_a_wrong_length_result_fails_the_whole_batch_with_a_clear_message(bad):
    async def run(inputs):
        return bad(inputs)

    async def main():
        batcher = Batcher(run, max_batch_size=8, max_wait_s=0.05)
        return await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, BatchResultError) for r in results)
    assert "one result per input" in str(results[0])


def test_a_list_like_result_is_one_result_per_row_and_a_failing_listener_does_not_stop_the_batches():
    import numpy as np

    async def run(inputs):
        return np.array([[x, x] for x in inputs])

    def listener(stats):
        raise RuntimeError("a broken display")

    async def main():
        batcher = Batcher(run, max_batch_size=8, max_wait_s=0.05, on_batch=listener)
        first = await asyncio.gather(*(batcher.submit(i) for i in range(3)))
        return first, await batcher.submit(7)

    first, after = asyncio.run(main())
    assert [r.tolist() for r in first] == [[0, 0], [1, 1], [2, 2]] and after.tolist() == [7, 7]


def test_requests_cancelled_mid_batch_and_in_the_queue_leave_the_others_answered():
    async def main():
        recorder = Recorder(held=True)
        batcher = Batcher(recorder, max_batch_size=8, max_wait_s=10)
        running = asyncio.ensure_future(batcher.submit(0))
        await recorder.entered.get()  # [0] runs, held
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        running.cancel()  # its caller disconnected while its batch runs: the answer is dropped
        queued[1].cancel()  # disconnected while queued: it leaves the queue, never reaching the model
        recorder.release()
        await recorder.entered.get()
        recorder.release()
        return recorder.batches, await asyncio.gather(running, *queued, return_exceptions=True)

    batches, results = asyncio.run(main())
    assert batches == [[0], [1, 3]]
    assert isinstance(results[0], asyncio.CancelledError) and isinstance(results[2], asyncio.CancelledError)
    assert (results[1], results[3]) == (10, 30)


def test_cancelled_requests_in_a_running_batch_do_not_break_it():
    async def main():
        recorder = Recorder(held=True)
        batcher = Batcher(recorder, max_batch_size=8, max_wait_s=10)
        first = asyncio.ensure_future(batcher.submit(0))
        await recorder.entered.get()
        first.cancel()  # the caller went away while its batch runs
        recorder.release()
        recorder.release()  # for the next batch
        after = await batcher.submit(5)  # the batcher still works
        return await asyncio.gather(first, return_exceptions=True), after

    (first,), after = asyncio.run(main())
    assert isinstance(first, asyncio.CancelledError) and after == 50


def test_sync_batch_function_runs_in_a_worker_thread_async_on_the_loop():
    seen = {}

    class Sync:
        def predict_batch(self, inputs):
            seen["sync"] = threading.current_thread() is not threading.main_thread()
            return [x + 1 for x in inputs]

    class Async:
        async def predict_batch(self, inputs):
            seen["async"] = threading.current_thread() is threading.main_thread()
            return [x + 2 for x in inputs]

    async def main(cls):
        model = exported(cls, max_batch_size=4, max_wait_ms=5)()
        return await asyncio.gather(*(model.predict(i) for i in range(6)))

    assert asyncio.run(main(Sync)) == [1, 2, 3, 4, 5, 6]
    assert asyncio.run(main(Async)) == [2, 3, 4, 5, 6, 7]
    assert seen == {"sync": True, "async": True}


# ---------------------------------------------------------------- the runtime: one path for kernel, server, Ray

BATCHING = "model_name: batched\nmodel_metadata:\n  batching: {max_batch_size: 8, max_wait_ms: 20}\n"


class Doubler:
    def __init__(self):
        self.seen = []

    def preprocess(self, model_input):
        return model_input["x"]

    def predict_batch(self, inputs):
        self.seen.append(list(inputs))
        return [ValueError(f"no negatives: {x}") if x < 0 else 2 * x for x in inputs]

    def postprocess(self, output):
        return {"y": output}


def _host(model_class, config=BATCHING):
    host = ModelHost(parse_config(config))
    host.define(model_class)
    host.load()
    return host


def test_the_host_batches_concurrent_predicts_with_pre_and_postprocess_per_request():
    host = _host(Doubler)

    async def main():
        return await asyncio.gather(*(host.predict({"x": i}) for i in range(20)))

    assert asyncio.run(main()) == [{"y": 2 * i} for i in range(20)]
    seen = host.instance.seen
    # Each input in exactly one batch. (In which order they join is the threads' of their sync preprocess: in
    # order on Python 3.11 here, not on 3.13; the answers above are each request's own either way.)
    assert sorted(x for b in seen for x in b) == list(range(20)) and max(map(len, seen)) == 8
    status = host.status()["batching"]
    assert status["max_batch_size"] == 8 and status["max_wait_ms"] == 20
    assert status["last_batch_sizes"] == [len(b) for b in seen]
    assert host.config.runtime.predict_concurrency == 16  # raised so concurrent requests reach the batcher


def test_a_lone_predict_is_a_batch_of_one_and_a_failing_input_fails_alone():
    host = _host(Doubler)
    assert asyncio.run(host.predict({"x": 4})) == {"y": 8}
    assert host.instance.seen == [[4]]

    async def main():
        return await asyncio.gather(host.predict({"x": 1}), host.predict({"x": -1}), host.predict({"x": 3}),
                                    return_exceptions=True)

    ok1, bad, ok3 = asyncio.run(main())
    assert (ok1, ok3) == ({"y": 2}, {"y": 6})
    assert isinstance(bad, ValueError) and str(bad) == "no negatives: -1"


def test_a_stop_iteration_from_model_code_fails_its_requests_and_the_model_answers_on():
    """asyncio cannot carry a StopIteration out of a worker thread: the requests of that batch (or the one unbatched
    request) waited for ever, and with them every later batch. It is a RuntimeError now, as in a generator."""
    class Finder:
        def predict_batch(self, inputs):
            return [next(x for x in ["a", "b"] if x == i) for i in inputs]  # no match: StopIteration

    class Slot:
        def predict_batch(self, inputs):
            return [StopIteration() if i == "stop" else i for i in inputs]  # returned in a slot

    class Plain:
        def predict(self, model_input):
            return next(iter(model_input))

    async def answers(host, inputs):
        return await asyncio.wait_for(asyncio.gather(*(host.predict(i) for i in inputs), return_exceptions=True), 30)

    finder = _host(Finder)
    failed = asyncio.run(answers(finder, ["z"]))
    assert isinstance(failed[0], RuntimeError) and "StopIteration" in str(failed[0])
    assert asyncio.run(answers(finder, ["a", "b"])) == ["a", "b"]  # the next batches run
    stop, fine = asyncio.run(answers(_host(Slot), ["stop", "fine"]))
    assert isinstance(stop, RuntimeError) and fine == "fine"
    plain = _host(Plain, config="model_name: plain\n")
    (empty,) = asyncio.run(answers(plain, [[]]))
    assert isinstance(empty, RuntimeError) and asyncio.run(answers(plain, [[7]])) == [7]


# A batch that fails the three ways it can: predict_batch raises, returns an Exception in a slot (never raised), or
# returns the wrong number of results. The user sees the message and their own frames, never ours.
FAILING_MODEL = """
class Model:
    def predict_batch(self, inputs):
        how = inputs[0]["how"]
        if how == "raise":
            return self.check(inputs)
        if how == "slot":
            return [ValueError("cannot embed a slot") for _ in inputs]
        return inputs + inputs

    def check(self, inputs):
        raise ValueError("cannot embed raise")
"""
FAILURES = [("raise", "ValueError: cannot embed raise", ["predict_batch", "check"]),
            ("slot", "ValueError: cannot embed a slot", []),
            ("length", "BatchResultError: predict_batch got 1 inputs and returned 2 results; it must return", [])]


def _frame_names(tb):
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


@pytest.mark.parametrize("how, message, frames", FAILURES)
def test_a_failing_batch_keeps_the_models_frames_and_only_those(how, message, frames):
    from kernel_magics.core.tracebacks import user_traceback

    namespace = {}
    exec(compile(FAILING_MODEL, "model.py", "exec"), namespace)
    host = _host(namespace["Model"])

    async def two_requests():  # one batch of two: each caller gets its own copy of the batch's error
        return await asyncio.gather(host.predict({"how": how}), host.predict({"how": how}), return_exceptions=True)

    for error in asyncio.run(two_requests()):
        assert f"{type(error).__name__}: {error}".startswith(message.split(" got ")[0])
        assert _frame_names(user_traceback(error.__traceback__)) == frames


def _failing_truss(root):
    import shutil

    from kernel_magics.core import batching
    from kernel_magics.core.export import batching_tail
    from server_harness import write_truss

    d = write_truss(root, FAILING_MODEL + batching_tail(parse_config(BATCHING)), BATCHING)
    (d / "packages").mkdir()
    shutil.copy(batching.__file__, d / "packages" / "kernel_magics_batching.py")
    return d


def _logged_after(served, mark, text, timeout=30):
    """The server's log after ``mark`` once it holds ``text`` (its log lines are written by a thread of their own)."""
    import time

    deadline = time.monotonic() + timeout
    while text not in served.log[mark:] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert text in served.log[mark:], served.log
    return served.log[mark:]


@pytest.mark.slow  # a server of its own
def test_kernel_magics_serve_logs_a_failing_batch_with_the_models_frames_only(tmp_path):
    import kernel_magics

    ours = kernel_magics.__path__[0]
    with serve_ours(_failing_truss(tmp_path / "failing")) as served:
        for how, message, frames in FAILURES:
            mark = len(served.log)
            answer = httpx.post(served.predict_url(), json={"how": how}, timeout=30)
            assert answer.status_code == 500
            assert answer.json() == {"error": "Internal Server Error (in model/chainlet)."}
            logged = _logged_after(served, mark, message)
            assert ours not in logged, logged  # no frame of ours
            assert all(f", in {name}" in logged for name in frames), logged


@pytest.mark.slow  # a kernel of its own
def test_model_predict_shows_a_failing_batch_with_the_models_frames_only(fresh_kernel, tmp_path):
    import kernel_magics

    ours = kernel_magics.__path__[0]
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok(f"%%model_config\n{BATCHING}")
    k.ok(f"%%model\n{FAILING_MODEL}")
    k.ok("%model_load")
    for how, message, frames in FAILURES:
        ex = k.execute(f'%model_predict {{"how": "{how}"}}')
        assert ex.status == "error" and message in ex.error_text, ex.error_text
        assert ours not in ex.error_text, ex.error_text
        assert all(f"in Model.{name}" in ex.error_text for name in frames), ex.error_text
        assert ("Traceback (most recent call last)" in ex.error_text) == bool(frames), ex.error_text  # none: no header
    # A StopIteration that leaves predict_batch (next() on an empty iterator) fails the batch as a RuntimeError: shown
    # with the user's own frame of what it came from.
    k.ok("%%model\nclass Model:\n    def predict_batch(self, inputs):\n        return [next(iter([])) for _ in inputs]")
    ex = k.execute('%model_predict {"how": "stop"}')
    assert ex.status == "error" and "RuntimeError: predict_batch raised StopIteration" in ex.error_text, ex.error_text
    assert "StopIteration" in ex.error_text.split("RuntimeError")[0] and ", in predict_batch" in ex.error_text
    assert ours not in ex.error_text, ex.error_text


def test_an_async_predict_batch_runs_on_the_loop():
    class AsyncModel:
        async def predict_batch(self, inputs):
            await asyncio.sleep(0)
            return [threading.current_thread().name for _ in inputs]

    host = _host(AsyncModel)

    async def main():
        return await asyncio.gather(*(host.predict(i) for i in range(3))), threading.current_thread().name

    names, loop_thread = asyncio.run(main())
    assert names == [loop_thread] * 3


def test_batching_declared_by_the_class_and_the_config_must_agree():
    host = _host(Doubler, config="model_name: x\n")
    with pytest.raises(ModelDefinitionError, match="does not declare batching.*max_batch_size"):
        asyncio.run(host.predict({"x": 1}))

    class Plain:
        def predict(self, model_input):
            return model_input

    host = _host(Plain)
    with pytest.raises(ModelDefinitionError, match="has no predict_batch"):
        asyncio.run(host.predict(1))


def test_a_class_with_predict_and_predict_batch_gets_a_clear_message():
    class Both:
        def predict(self, model_input):
            return model_input

        def predict_batch(self, inputs):
            return inputs

    class Streaming:
        def predict(self, model_input):
            yield "a"

        def predict_batch(self, inputs):
            return inputs

    class GeneratorBatch:
        def predict_batch(self, inputs):
            yield inputs

    with pytest.raises(ModelDefinitionError, match="both predict and predict_batch.*remove predict"):
        ModelContract.inspect(Both, batching=True)
    with pytest.raises(ModelDefinitionError, match="streaming predicts are not batched"):
        ModelContract.inspect(Streaming, batching=True)
    with pytest.raises(ModelDefinitionError, match="cannot stream"):
        ModelContract.inspect(GeneratorBatch)
    # Without batching in the config, a predict_batch beside the class's own predict is its helper, whatever its
    # signature (a Truss written elsewhere, which Truss's server serves through predict): served as it is.
    for cls in (Both, Streaming):
        contract = ModelContract.inspect(cls)
        assert contract.predict_batch is None and contract.predict.name == "predict"

    class Helper:
        def predict_batch(self, texts, batch_size=32):
            return [t.upper() for t in texts]

        def predict(self, model_input):
            return self.predict_batch([model_input])[0]

    host = _host(Helper, config="model_name: helper\n")
    assert asyncio.run(host.predict("hi")) == "HI"
    # The predict an export generates for Truss's server is not the user's own: the class still batches.
    contract = ModelContract.inspect(exported(Doubler, 8, 20))
    assert contract.predict_batch is not None and contract.predict.name == "predict_batch"


@pytest.mark.parametrize("batching, message", [
    ("{max_batch_size: 0}", "max_batch_size must be an integer from 1 to 4096, not 0"),
    ("{max_batch_size: 2.5}", "max_batch_size must be an integer"),
    ("{max_wait_ms: -1}", "max_wait_ms must be a number of milliseconds from 0 to 10000"),
    ("{max_batch: 4}", "unknown key `model_metadata.batching.max_batch` (did you mean `max_batch_size`?)"),
    ("[32]", "must be a mapping such as"),
])
def test_bad_batching_settings_get_one_paragraph(batching, message):
    with pytest.raises(ConfigError) as info:
        parse_config(f"model_name: x\nmodel_metadata:\n  batching: {batching}\n", source="%%model_config cell")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_batching_false_turns_it_off_and_true_or_an_empty_section_takes_the_defaults():
    assert parse_config("model_name: x\nmodel_metadata: {batching: false}\n").batching is None
    for on in ("true", "", "{}"):
        settings = parse_config(f"model_name: x\nmodel_metadata:\n  batching: {on}\n").batching
        assert settings is not None and settings.max_batch_size == 32


def test_a_predict_concurrency_below_the_batch_size_is_refused_and_a_larger_one_kept():
    with pytest.raises(ConfigError, match="predict_concurrency is 2.*at least 8"):
        parse_config("runtime: {predict_concurrency: 2}\n" + BATCHING)
    assert parse_config("runtime: {predict_concurrency: 40}\n" + BATCHING).runtime.predict_concurrency == 40
    assert "predict_concurrency: 16" in parse_config(BATCHING).to_yaml()  # what the export writes


# ---------------------------------------------------------------- the notebook: define, show, predict, status

@pytest.mark.slow  # a kernel of its own: about 5 to 10 s here under load
def test_the_notebook_shows_batching_and_predicts_a_batch_of_one(fresh_kernel, tmp_path):
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok(BATCHED_NOTEBOOK[1])
    assert "batched: predict_batch" in k.ok(BATCHED_NOTEBOOK[2]).stdout
    shown = k.ok("%model_show").outputs[0]["data"]["text/plain"]
    assert "def predict_batch" in shown and "@kernel_magics_batching.batched(max_batch_size=8, max_wait_ms=50" in shown
    config = k.ok("%model_show config.yaml").outputs[0]["data"]["text/plain"]
    assert "predict_concurrency: 16" in config and "max_batch_size: 8" in config
    k.ok("%model_load")
    assert k.ok("%model_predict {\"x\": 5}").result == "{'y': 10, 'batch': 1}"
    status = k.ok("%model_status").stdout
    assert "batching: up to 8, wait 50 ms; last batch sizes: 1" in status
    payload = k.ok("from kernel_magics.notebook.frontend import model_status\n"
                   "print(model_status(get_ipython().find_magic('model_status').__self__)['batching'])").stdout
    assert "'last_batch_sizes': [1]" in payload


# ---------------------------------------------------------------- %model_bench

@pytest.mark.slow  # a kernel of its own and three load levels: about 10 s here under load
def test_model_bench_measures_levels_shows_batches_and_a_plot_and_stops_on_interrupt(fresh_kernel, tmp_path):
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    assert "run %model_load first" in k.execute("%model_bench 1").reply["evalue"]
    k.ok(BATCHED_NOTEBOOK[1])
    k.ok(BATCHED_NOTEBOOK[2])
    k.ok("%model_load")
    ex = k.ok('%model_bench --concurrency 1,8 --requests 40 --duration 60 {"x": 2}')
    lines = ex.stdout.splitlines()
    assert lines[1].startswith("concurrency 1: ") and "batch size mean 1.0 max 1" in lines[1]
    assert lines[2].startswith("concurrency 8: ") and "req/s, p50 " in lines[2]
    assert int(lines[2].rsplit("max ", 1)[1]) > 1  # eight callers: the model ran batches of more than one
    assert "The model batches (predict_batch)" in ex.stdout
    assert any("image/png" in o.get("data", {}) for o in ex.outputs)
    usage = "%model_bench [--concurrency 1,8,32] [--requests N] [--duration S] [--http] [INPUT ...]"
    help_text = k.ok("print(get_ipython().find_line_magic('model_bench').__doc__)").stdout
    assert usage in " ".join(help_text.split())  # what %model_bench? shows is what the errors say
    for line, message in [("--concurency 3 1",
                           f"Unknown option --concurency for %model_bench (did you mean --concurrency?). Usage: {usage}"),
                          ("--verbose 1", f"Unknown option --verbose for %model_bench. Usage: {usage}"),
                          ("--requests 0 1", "--requests 0: it must be"), ("--http=1 1", "--http takes no value"),
                          ("--concurrency 1,x 1", "--concurrency 1,x: it must be"), ("", f"Usage: {usage}"),
                          ("--concurrency 1, 8, x 1", "--concurrency 1, 8, x: it must be"), ("--duration", "needs a")]:
        assert message in k.execute(f"%model_bench {line}").reply["evalue"]
    spaced = k.ok('%model_bench --concurrency 2, 4 --requests 4 {"x": 2}').stdout  # a space after the comma
    assert "at concurrency 2, 4: up to 4 requests" in spaced and "concurrency 4: " in spaced
    # Stop: a model stuck in its batch; the interrupt ends the bench with what it measured, the kernel goes on.
    k.ok("import asyncio")
    k.ok("%%model\nclass Model:\n    async def predict_batch(self, inputs):\n"
         "        print('started', flush=True)\n        await asyncio.sleep(60)\n        return inputs")
    sent = []
    ex = k.execute("%model_bench --duration 600 1", timeout=60, on_message=lambda m: (
        not sent and m["msg_type"] == "stream" and "started" in m["content"]["text"]
        and (k.interrupt(), sent.append(1))))
    assert sent and ex.status == "ok" and "Stopped" in ex.stdout
    assert k.ok("2 * 21").result == "42"


def _predict_counts(base_url):
    """The server's /metrics count of predict requests, by status."""
    counts = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("kernel_magics_requests_total{") and 'route="/v1/models/{model_name}:predict"' in line:
            status = re.search(r'status="(\d+)"', line)[1]
            counts[status] = counts.get(status, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


STREAM_OR_JSON_MODEL = """
class Model:
    def predict(self, model_input):
        if model_input.get("fail"):
            raise ValueError("asked to fail")
        if model_input.get("stream"):
            return (f"chunk {i};" for i in range(model_input["stream"]))
        return {"echo": model_input}
"""


def test_the_bench_advice_follows_the_predict_bound_not_the_throughput_alone():
    """A model that takes microseconds gains throughput with concurrency at a bound of 1 (the server's own work overlaps
    the model's): it still runs one request at a time, and batching is what would help. A model that waits with a
    bound of 8 serves side by side."""
    from kernel_magics.core.config import parse_config
    from kernel_magics.core.load_test import InProcess, advice, run_bench
    from kernel_magics.core.runtime import ModelHost

    class Quick:
        def predict(self, x):
            return x * 2

    class Waits:
        async def predict(self, x):
            await asyncio.sleep(0.01)
            return x * 2

    def bench(cls, config="", requests=400):
        host = ModelHost(parse_config(config))
        host.define(cls)
        host.load()
        levels = asyncio.run(run_bench(InProcess(host, 2), [1, 8], requests=requests, duration=30))
        return advice(levels, batches=False, streams=False, bound=host.config.runtime.predict_concurrency)

    quick = bench(Quick)
    assert "runtime.predict_concurrency is 1: requests run one at a time" in quick
    assert "batching would likely help" in quick
    waits = bench(Waits, "runtime: {predict_concurrency: 8}\n", requests=40)
    assert "the model already serves requests side by side" in waits


@pytest.mark.parametrize("bound, gain, says, never", [
    (1, 0.8, "requests run one at a time (throughput 0.80x from concurrency 1 to 32)", "overlapped"),
    (4, 1.1, "Throughput stays flat (1.10x from concurrency 1 to 32): running up to 4 requests at once does not raise",
     "one at a time"),
    (None, 2.0, "the model already serves requests side by side", "one at a time"),  # Ray replicas: bound unknown
    (None, 1.0, "Throughput stays flat (1.00x from concurrency 1 to 32). If the model", "at once"),
])
def test_the_bench_advice_says_what_the_bound_and_the_levels_show(bound, gain, says, never):
    from kernel_magics.core.load_test import LevelResult, advice

    levels = [LevelResult(1, seconds=1.0, latencies=[0.01] * 100),
              LevelResult(32, seconds=1.0, latencies=[0.01] * round(100 * gain))]
    text = advice(levels, batches=False, streams=False, bound=bound)
    assert says in text and never not in text


@pytest.mark.slow  # a server of its own
def test_the_bench_http_client_reads_json_streams_and_errors_and_keeps_its_connection(tmp_path):
    """The bench's client (standard library only): a Content-Length answer, a chunked stream, an error status with
    its body, each read whole so that the caller's one keep-alive connection goes on; and the closed loop over it."""
    from kernel_magics.core.load_test import HTTPStatusError, OverHTTP, run_bench
    from server_harness import write_truss

    d = write_truss(tmp_path / "echo", STREAM_OR_JSON_MODEL)

    async def on_one_connection(url, model_input, times=3):
        """A caller's answers to ``times`` requests, and whether they all went over its one connection."""
        target = OverHTTP(url, model_input)
        async with target.caller() as send:
            connection = send.__self__
            writer, answers = connection._writer, []
            for _ in range(times):
                try:
                    answers.append(await send())
                except HTTPStatusError as exc:
                    answers.append(target.describe(exc))
            return answers, writer is not None and connection._writer is writer

    with serve_ours(d) as served:
        url = served.predict_url()
        answers, kept = asyncio.run(on_one_connection(url, {"x": 1}))
        assert [json.loads(a) for a in answers] == [{"echo": {"x": 1}}] * 3 and kept  # Content-Length
        answers, kept = asyncio.run(on_one_connection(url, {"stream": 300}))
        assert answers == ["".join(f"chunk {i};" for i in range(300)).encode()] * 3 and kept  # chunked
        answers, kept = asyncio.run(on_one_connection(url, {"fail": True}))
        assert answers == ['HTTP 500: {"error":"Internal Server Error (in model/chainlet)."}'] * 3 and kept
        levels = asyncio.run(run_bench(OverHTTP(url, {"stream": 2}), [1, 4], requests=12, duration=60))
        assert [(lv.concurrency, lv.completed, lv.errors) for lv in levels] == [(1, 12, 0), (4, 12, 0)]


@pytest.mark.slow  # a kernel of its own, %model_serve and four benches: about 15 s here under load
def test_model_bench_over_http_sends_real_requests_to_model_serve(fresh_kernel, tmp_path):
    from server_harness import wait_for

    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok(BATCHED_NOTEBOOK[1])
    k.ok(BATCHED_NOTEBOOK[2])
    k.ok("%model_load")
    no_server = k.execute('%model_bench --http {"x": 2}').reply["evalue"]
    assert "none is running: run %model_serve --port 0 first" in no_server
    k.ok("url = %model_serve --port 0")
    url = ast.literal_eval(k.ok("url").result)
    port = url.rsplit(":", 1)[1]
    before = _predict_counts(url)
    ex = k.ok('%model_bench --http --concurrency 1,8 --requests 40 --duration 60 {"x": 2}')
    lines = ex.stdout.splitlines()
    assert f"over HTTP (%model_serve on port {port}) at concurrency 1, 8" in lines[0]
    assert lines[1].startswith("concurrency 1: ") and "batch size mean 1.0 max 1" in lines[1]
    assert lines[2].startswith("concurrency 8: ") and int(lines[2].rsplit("max ", 1)[1]) > 1  # the host's batches
    assert f"80 requests answered over HTTP by {url}/v1/models/model:predict (and one warm-up" in lines[3]
    after = _predict_counts(url)  # every one of them reached the server
    assert after.get("200", 0) - before.get("200", 0) == 81 and after.keys() == {"200"}
    assert any("image/png" in o.get("data", {}) for o in ex.outputs)

    # An error status is a failed request, its body shown as the in-process bench shows an exception.
    k.ok("import itertools\ncount = itertools.count()")
    k.ok("%%model\nclass Model:\n    def predict_batch(self, inputs):\n"
         "        return [ValueError('odd') if next(count) % 2 else {'y': 1} for i in inputs]")
    ex = k.ok('%model_bench --http --concurrency 2 --requests 10 {"x": 2}')
    assert ('concurrency 2: ' in ex.stdout and
            '5 failed (HTTP 500: {"error":"Internal Server Error (in model/chainlet)."})' in ex.stdout), ex.stdout
    assert _predict_counts(url)["500"] == 5
    # The warm-up request fails (the 12th input is odd): one paragraph, nothing measured.
    error = k.execute('%model_bench --http {"x": 2}').reply["evalue"]
    assert error.startswith(f"The first request to {url}/v1/models/model:predict failed (HTTP 500: ")
    assert "\n" not in error

    # Stop: the served model is stuck in its batch; the interrupt ends the bench, the kernel goes on.
    marker = tmp_path / "started"
    k.ok("import asyncio")
    k.ok(f"%%model\nclass Model:\n    async def predict_batch(self, inputs):\n"
         f"        open({str(marker)!r}, 'w').close()\n        await asyncio.sleep(60)\n        return inputs")
    stopper = threading.Thread(target=lambda: wait_for(marker, 60) and k.interrupt())
    stopper.start()
    ex = k.execute("%model_bench --http --duration 600 1", timeout=60)
    stopper.join()
    assert marker.exists() and ex.status == "ok" and "Stopped" in ex.stdout
    assert k.ok("2 * 21").result == "42"


# ---------------------------------------------------------------- the export: our server and Truss's own batch it

BATCHED_NOTEBOOK = [
    "%load_ext kernel_magics",
    "%%model_config\nmodel_name: batched\nmodel_metadata:\n  batching: {max_batch_size: 8, max_wait_ms: 50}",
    # The batch takes 0.2 s, as a model's would: the requests that arrive meanwhile form the next batch, however
    # far apart a busy machine spaces them (instant, with the 50 ms wait, a loaded run saw batches of one only).
    "%%model\nimport time\n\nclass Model:\n"
    "    def predict_batch(self, inputs):\n"
    "        time.sleep(0.2)\n"
    "        return [{'y': 2 * i['x'], 'batch': len(inputs)} if i['x'] >= 0 else ValueError('negative')\n"
    "                for i in inputs]",
    "%model_load",
    "import json\nprint(json.dumps(get_ipython().run_line_magic('model_predict', '{\"x\": 21}')))",
    "%model_export out",
]


def test_the_export_batches_under_truss_s_own_server_and_ours_with_the_notebooks_answers(tmp_path, truss_validate):
    path = write_notebook(tmp_path / "batched.ipynb", BATCHED_NOTEBOOK)
    k, results = run_notebook_cells(path)
    k.shutdown()
    notebook = json.loads(results[4].stdout.strip().splitlines()[-1])
    assert notebook == {"y": 42, "batch": 1}  # %model_predict: a batch of one
    assert "Replayed 1 recorded prediction" in results[5].stdout
    out = tmp_path / "out"
    files = files_of(out)
    assert "packages/kernel_magics_batching.py" in files and b"predict_concurrency: 16" in files["config.yaml"]
    truss_validate(out)
    bodies = [{"x": i} for i in range(24)] + [{"x": -1}]
    for serve in (serve_truss, serve_ours):
        with serve(out) as served:
            lone = httpx.post(served.predict_url(), json={"x": 21}, timeout=30)
            assert lone.json() == notebook, served.log  # a lone request on an idle server: a batch of one
            answers = post_concurrently(served.predict_url(), bodies)
            assert [a.json()["y"] for a in answers[:-1]] == [2 * i for i in range(24)], serve.__name__
            assert max(a.json()["batch"] for a in answers[:-1]) > 1, serve.__name__
            assert answers[-1].status_code == 500  # only the failing input fails
            if serve is serve_ours:
                metrics = httpx.get(f"{served.url}/metrics", timeout=10).text
                assert "kernel_magics_batch_size_count" in metrics and "kernel_magics_batch_wait_seconds" in metrics


# ---------------------------------------------------------------- Ray Serve: each replica batches its own requests

# The batch takes 20 ms, as a model's would: the requests that arrive meanwhile form the next batch. (Instant, a
# batch of one ended before the next request came whenever the machine spaced them out: batches of one for ever.)
BATCHED_MODEL_PY = '''
import time


class Model:
    def predict_batch(self, inputs):
        time.sleep(0.02)
        return [{"i": i["i"], "batch": len(inputs)} for i in inputs]
'''


def test_each_ray_replica_batches_its_own_requests(tmp_path, ray_cluster):
    import shutil

    from kernel_magics.core import batching
    from kernel_magics.core.export import batching_tail
    from server_harness import write_truss

    config = "model_name: batched\nmodel_metadata:\n  batching: {max_batch_size: 16, max_wait_ms: 50}\n"
    # The layout an export writes: the generated predict at the end of model.py, the batcher in packages/.
    d = write_truss(tmp_path / "batched", BATCHED_MODEL_PY + batching_tail(parse_config(config)), config)
    (d / "packages").mkdir()
    shutil.copy(batching.__file__, d / "packages" / "kernel_magics_batching.py")
    with serve_ours(d, engine=ray_cluster, replicas=2) as s:
        responses = post_concurrently(s.predict_url(), [{"i": i} for i in range(64)])
        assert [r.status_code for r in responses] == [200] * 64, s.log[-3000:]
        assert [r.json()["i"] for r in responses] == list(range(64))
        by_replica: dict = {}
        for r in responses:
            by_replica.setdefault(r.headers["x-kernel-magics-replica"], []).append(r.json()["batch"])
        assert max(max(sizes) for sizes in by_replica.values()) > 1, by_replica
        assert all(max(sizes) <= 16 for sizes in by_replica.values())


def test_unload_lets_go_of_the_instance_the_batcher_held():
    import gc
    import weakref

    host = _host(Doubler)
    assert asyncio.run(host.predict({"x": 1})) == {"y": 2}
    instance = weakref.ref(host.instance)
    host.unload()
    gc.collect()
    assert instance() is None


def test_a_hand_written_directory_with_only_predict_batch_is_told_what_truss_needs(tmp_path):
    from kernel_magics.core.truss_dir import TrussDir, TrussDirError
    from server_harness import write_truss

    d = write_truss(tmp_path / "bare", BATCHED_MODEL_PY, BATCHING)
    with pytest.raises(TrussDirError, match="has predict_batch, but Truss's server calls predict"):
        TrussDir.open(d).check_static()
