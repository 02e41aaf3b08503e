"""ModelHost runs the Truss contract; tested directly, with real classes and real threads."""

import asyncio
import json
import threading
import time
import traceback

import pydantic
import pytest

from kernel_magics.core.config import parse_config
from kernel_magics.core.errors import (
    InputValidationError, ModelDefinitionError, ModelNotReadyError, NotSerializableError, SecretNotFound,
)
from kernel_magics.core.runtime import ChunkStream, ModelHost, ModelState
from kernel_magics.core.secrets import SecretStore


def loaded(cls, config_text: str = "", **kw) -> ModelHost:
    host = ModelHost(parse_config(config_text), **kw)
    host.define(cls)
    host.load()
    return host


def collect(host, model_input):
    return asyncio.run(host.collect(model_input))


# ---------------------------------------------------------------- __init__ kwargs and load

def test_init_gets_only_the_kwargs_its_signature_names(tmp_path):
    class Named:
        def __init__(self, config, secrets):
            self.got = {"config": config, "secrets": secrets}

        def predict(self, x):
            return sorted(self.got)

    class Star:
        def __init__(self, **kwargs):
            self.got = kwargs

        def predict(self, x):
            return sorted(self.got)

    class Bare:
        def predict(self, x):
            return "ok"

    assert collect(loaded(Named), {}) == ["config", "secrets"]
    assert collect(loaded(Star, base_dir=tmp_path), {}) == ["config", "data_dir", "environment", "secrets"]
    host = loaded(Star, "model_name: m\ndata_dir: assets\n", base_dir=tmp_path)
    assert host.instance.got["config"]["model_name"] == "m"
    assert host.instance.got["data_dir"] == tmp_path / "assets"
    assert host.instance.got["environment"] is None
    assert collect(loaded(Bare), {}) == "ok"


def test_load_failure_sets_failed_and_keeps_the_users_exception():
    class Broken:
        def load(self):
            raise ValueError("weights missing")

        def predict(self, x):
            return x

    host = ModelHost()
    host.define(Broken)
    with pytest.raises(ValueError, match="weights missing") as info:
        host.load()
    assert host.state is ModelState.FAILED
    assert host.error is info.value
    assert traceback.extract_tb(info.value.__traceback__)[-1].name == "load"
    with pytest.raises(ModelNotReadyError, match="last load failed"):
        collect(host, {})


def test_environment_variables_are_set_before_load(monkeypatch):
    monkeypatch.delenv("KM_TEST_FLAG", raising=False)

    class Reads:
        def load(self):
            import os
            self.flag = os.environ["KM_TEST_FLAG"]

        def predict(self, x):
            return self.flag

    assert collect(loaded(Reads, "environment_variables: {KM_TEST_FLAG: true}\n"), {}) == "true"


def test_predict_before_definition_or_load_says_what_to_do():
    host = ModelHost()
    with pytest.raises(ModelNotReadyError, match="%%model"):
        collect(host, {})
    host.define(type("Model", (), {"predict": lambda self, x: x}))
    with pytest.raises(ModelNotReadyError, match="%model_load"):
        collect(host, {})


# ---------------------------------------------------------------- contract errors

@pytest.mark.parametrize("body, message", [
    ({}, "has no `predict` method"),
    ({"predict": lambda self, x: x, "load": lambda self, path: None}, "must take no arguments besides self"),
    ({"predict": lambda self, a, b: a}, "the second must be the request"),
    ({"predict": lambda self, a, b, c: a}, "must take one argument"),
    ({"predict": lambda self, x: x, "load": lambda self: None, "is_healthy": lambda self, x: True},
     "is_healthy` must take no arguments"),
    ({"predict": 3}, "must be a method"),
])
def test_contract_violations_are_model_definition_errors(body, message):
    with pytest.raises(ModelDefinitionError, match=message):
        ModelHost().define(type("Model", (), body))


def test_a_batching_config_asks_a_class_without_either_method_for_predict_batch():
    from kernel_magics.core.contract import ModelContract

    with pytest.raises(ModelDefinitionError, match=r"neither `predict_batch` nor `predict`.*def predict_batch\(self"):
        ModelContract.inspect(type("Model", (), {"load": lambda self: None}), batching=True)


# ---------------------------------------------------------------- predict styles

def test_sync_predict_runs_in_a_worker_thread():
    class M:
        def predict(self, x):
            return threading.current_thread().name

    assert collect(loaded(M), {}).startswith("model-predict")


def test_async_predict_is_awaited_on_the_loop():
    class M:
        async def predict(self, x):
            await asyncio.sleep(0)
            return {"loop": asyncio.get_running_loop() is not None, "x": x["x"]}

    assert collect(loaded(M), {"x": 1}) == {"loop": True, "x": 1}


def test_generators_text_chunks_join_and_other_chunks_list():
    class Text:
        def predict(self, x):
            yield from ["a", "b", "c"]

    class Dicts:
        async def predict(self, x):
            for i in range(3):
                yield {"i": i}

    assert collect(loaded(Text), {}) == "abc"
    assert collect(loaded(Dicts), {}) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_pre_and_postprocess_sync_and_async_run_around_predict():
    class M:
        async def preprocess(self, x):
            return x["n"] + 1

        def predict(self, n):
            return n * 10

        def postprocess(self, y):
            return {"y": y}

    assert collect(loaded(M), {"n": 1}) == {"y": 20}


def test_streaming_with_postprocess_is_refused_as_truss_does():
    class M:
        def predict(self, x):
            yield "a"

        def postprocess(self, y):
            return y

    with pytest.raises(ModelDefinitionError, match="cannot be postprocessed"):
        collect(loaded(M), {})


class Prompt(pydantic.BaseModel):
    prompt: str
    max_tokens: int = 5


class Answer(pydantic.BaseModel):
    text: str
    tokens: int


def test_pydantic_input_is_validated_and_output_serialized():
    class M:
        def predict(self, model_input: Prompt) -> Answer:
            return Answer(text=model_input.prompt.upper(), tokens=model_input.max_tokens)

    host = loaded(M)
    assert collect(host, {"prompt": "hi"}) == {"text": "HI", "tokens": 5}
    with pytest.raises(InputValidationError, match="`prompt`: Field required"):
        collect(host, {"max_tokens": 3})


def test_non_serializable_output_names_type_and_place():
    class M:
        def predict(self, x):
            return {"scores": [1.0, object()]}

    with pytest.raises(NotSerializableError, match=r"object at the prediction\['scores'\]\[1\]"):
        collect(loaded(M), {})


def test_a_pydantic_result_is_in_the_notebook_what_the_server_sends():
    class Out(pydantic.BaseModel):
        score: float
        scores: list[float]

    class M:
        def predict(self, x):
            return Out(score=float("nan"), scores=[float("inf"), 0.1])

    host = loaded(M)
    sent = asyncio.run(host.predict({}, encoded=True))
    assert bytes(sent) == b'{"score":null,"scores":[null,0.1]}'  # what Truss sends too (pydantic's own JSON)
    assert collect(host, {}) == json.loads(sent)  # what %model_predict gives


# ---------------------------------------------------------------- concurrency and stream closing

def max_in_flight(concurrency: int) -> int:
    class M:
        def load(self):
            self.now = self.peak = 0

        async def predict(self, x):
            self.now += 1
            self.peak = max(self.peak, self.now)
            await asyncio.sleep(0.02)
            self.now -= 1
            return self.peak

    host = loaded(M, f"runtime: {{predict_concurrency: {concurrency}}}\n")

    async def main():
        await asyncio.gather(*(host.predict({}) for _ in range(6)))

    asyncio.run(main())
    return host.instance.peak


def test_predict_concurrency_bounds_predicts():
    assert max_in_flight(1) == 1
    assert max_in_flight(3) == 3


@pytest.mark.parametrize("is_async", [False, True])
def test_closing_a_stream_runs_the_generators_finally_and_frees_the_slot(is_async):
    events = []

    if is_async:
        class M:
            async def predict(self, x):
                try:
                    for i in range(1000):
                        yield str(i)
                        await asyncio.sleep(0.001)
                finally:
                    events.append("finally")
    else:
        class M:
            def predict(self, x):
                try:
                    for i in range(1000):
                        yield str(i)
                finally:
                    events.append("finally")

    host = loaded(M)

    async def main():
        stream = await host.predict({})
        assert isinstance(stream, ChunkStream)
        assert await stream.__anext__() == "0"
        await stream.aclose()
        # The slot is free again: a second stream can start at concurrency 1.
        again = await asyncio.wait_for(host.predict({}), 2)
        await again.aclose()

    asyncio.run(main())
    assert events == ["finally"]  # the second stream never started, so it has no finally to run


# ---------------------------------------------------------------- the slot of a sync predict (core/slots.py)

class Gated:
    """A sync predict that records its calls in order and waits for a gate on the inputs that ask for one."""

    def load(self):
        self.calls, self.threads, self.now, self.peak = [], set(), 0, 0
        self.gate, self.started = threading.Event(), threading.Event()

    def predict(self, x):
        self.now += 1
        self.peak = max(self.peak, self.now)
        self.calls.append(x["i"])
        self.threads.add(threading.get_ident())
        if x.get("wait"):
            self.started.set()
            assert self.gate.wait(10)
        self.now -= 1
        if x.get("stream"):
            return (chunk for chunk in "ab")  # a stream a sync predict returns
        return x["i"]


async def one_running_one_waiting(host):
    """Input 0 predicting (held at the gate) and input 1 waiting for the one slot."""
    running = asyncio.ensure_future(host.predict({"i": 0, "wait": True}))
    waiting = asyncio.ensure_future(host.predict({"i": 1}))
    await asyncio.sleep(0)
    assert await asyncio.to_thread(host.instance.started.wait, 10)
    return running, waiting


def test_sync_predicts_keep_the_bound_and_the_order_they_arrived_in():
    host = loaded(Gated, "runtime: {predict_concurrency: 2}\n")

    async def main():
        first = asyncio.ensure_future(host.predict({"i": 0, "wait": True}))
        second = asyncio.ensure_future(host.predict({"i": 1, "wait": True}))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(host.predict({"i": i})) for i in range(2, 12)]
        await asyncio.sleep(0.05)
        assert host.instance.calls[2:] == []  # both slots are taken until the gate opens
        host.instance.gate.set()
        return await asyncio.gather(first, second, *rest)

    assert asyncio.run(main()) == list(range(12))
    assert host.instance.peak == 2 and host.instance.calls[2:] == list(range(2, 12))


def test_a_sync_predict_that_ends_starts_the_next_waiting_one_without_the_event_loop():
    """The freed slot goes to the next sync call in the worker thread that freed it: the calls run back to back
    while the event loop is busy elsewhere (here: blocked outright)."""
    host = loaded(Gated)

    async def main():
        running = [asyncio.ensure_future(host.predict({"i": i, "wait": i == 0})) for i in range(4)]
        await asyncio.sleep(0)
        assert host.instance.started.wait(10)
        host.instance.gate.set()
        deadline = time.monotonic() + 10
        while len(host.instance.calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.001)  # blocks the loop: no request can be woken meanwhile
        assert host.instance.calls == [0, 1, 2, 3]
        return await asyncio.gather(*running)

    assert asyncio.run(main()) == [0, 1, 2, 3]
    assert host.instance.peak == 1 and len(host.instance.threads) == 1


def test_a_request_cancelled_while_it_waits_never_runs_and_one_cancelled_while_it_runs_keeps_the_slot():
    host = loaded(Gated)

    async def main():
        running, waiting = await one_running_one_waiting(host)
        waiting.cancel()
        running.cancel()  # Python cannot stop its thread: the slot stays taken until the model's code returns
        after = asyncio.ensure_future(host.predict({"i": 2}))
        await asyncio.sleep(0.05)
        assert host.instance.calls == [0]
        host.instance.gate.set()
        assert await asyncio.wait_for(after, 10) == 2
        for task in (running, waiting):
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert host.instance.calls == [0, 2] and host.instance.peak == 1


def test_a_stream_a_sync_predict_returns_keeps_the_slot_until_it_closes():
    host = loaded(Gated)

    async def main():
        stream = await host.predict({"i": 0, "stream": True})
        assert isinstance(stream, ChunkStream)
        after = asyncio.ensure_future(host.predict({"i": 1}))
        await asyncio.sleep(0.05)
        assert host.instance.calls == [0] and not after.done()
        assert [chunk async for chunk in stream] == ["a", "b"]
        await stream.aclose()
        assert await asyncio.wait_for(after, 10) == 1

    asyncio.run(main())


def test_a_request_cancelled_while_it_waits_is_not_run_when_the_slot_frees_before_its_loop_sees_the_cancel():
    """A cancellation lands at once, but the request's code sees it only on its loop's next turn, which under load is
    long: a predict that ends meanwhile must not hand its slot to the request that left."""
    host = loaded(Gated)

    async def main():
        running, waiting = await one_running_one_waiting(host)
        waiting.cancel()
        host.instance.gate.set()
        time.sleep(0.3)  # one long turn of the loop: the first predict ends and frees its slot meanwhile
        assert await running == 0
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return await asyncio.wait_for(host.predict({"i": 2}), 10)

    assert asyncio.run(main()) == 2
    assert host.instance.calls == [0, 2]


def test_hundreds_of_waiting_requests_cancelled_at_once_pass_the_slot_on_and_the_next_request_runs():
    """(A timeout that fires for every client at once, a loop that shuts down.) Each cancelled waiter passes the slot
    to the next: in a loop, not one call deeper each."""

    class M:
        async def predict(self, x):
            if x == 0:
                await asyncio.Event().wait()  # holds the slot until it is cancelled with the rest
            return x

    host = loaded(M)

    async def main():
        holder = asyncio.ensure_future(host.predict(0))
        await asyncio.sleep(0.01)
        waiters = [asyncio.ensure_future(host.predict(i)) for i in range(1, 1501)]
        await asyncio.sleep(0.01)
        for task in (holder, *waiters):
            task.cancel()
        results = await asyncio.gather(holder, *waiters, return_exceptions=True)
        assert [r for r in results if not isinstance(r, asyncio.CancelledError)] == []
        return await asyncio.wait_for(host.predict(99), 10)

    assert asyncio.run(main()) == 99


def test_requests_waiting_for_the_slot_run_the_predict_of_a_class_swapped_in_meanwhile():
    """Re-running the %%model cell while requests wait (a server or %model_bench driving the model): they answer with
    the new predict, as requests that waited on a semaphore did."""
    gate = threading.Event()

    class M:
        def predict(self, x):
            if x == 0:
                assert gate.wait(10)
            return ["old", x]

    class M2:
        def predict(self, x):
            return ["new", x]

    host = loaded(M)

    async def main():
        first = asyncio.ensure_future(host.predict(0))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(host.predict(1))
        await asyncio.sleep(0.05)
        assert host.define(M2).hot_swapped
        gate.set()
        return [await first, await second, await host.predict(2)]

    assert asyncio.run(main()) == [["old", 0], ["new", 1], ["new", 2]]


def test_predicts_run_back_to_back_each_get_their_own_answer_error_and_request_context():
    import contextvars

    request_id = contextvars.ContextVar("request_id")
    gate = threading.Event()

    class M:
        def predict(self, x):
            if x == 0:
                assert gate.wait(10)
            if x == 2:
                raise ValueError("two")
            return [x, request_id.get()]

    host = loaded(M)

    async def one(i):
        request_id.set(f"r{i}")
        return await host.predict(i)

    async def main():
        tasks = [asyncio.ensure_future(one(i)) for i in range(5)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    answers = asyncio.run(main())
    assert answers[:2] == [[0, "r0"], [1, "r1"]] and answers[3:] == [[3, "r3"], [4, "r4"]]
    assert isinstance(answers[2], ValueError) and str(answers[2]) == "two"


def test_a_waiting_async_request_gets_the_slot_a_worker_thread_frees():
    """The hand-on from a worker thread to a request waiting on its loop (a model swapped from a sync predict to an
    async one while requests wait)."""
    gate = threading.Event()

    class Sync:
        def predict(self, x):
            assert gate.wait(10)
            return ["sync", x]

    class Async:
        async def predict(self, x):
            return ["async", x]

    host = loaded(Sync)

    async def main():
        first = asyncio.ensure_future(host.predict(0))
        await asyncio.sleep(0.05)
        host.define(Async)
        second = asyncio.ensure_future(host.predict(1))  # waits on the loop for the slot the sync predict holds
        await asyncio.sleep(0.05)
        assert not second.done()
        gate.set()
        return [await first, await asyncio.wait_for(second, 10), await host.predict(2)]

    assert asyncio.run(main()) == [["sync", 0], ["async", 1], ["async", 2]]


def test_a_config_set_again_while_requests_wait_keeps_one_bound_and_a_larger_one_lets_them_in():
    """%%model_config run again while a server's requests queue: the same bound goes on (a fresh one had let a second
    predict run beside the first); a larger one lets the waiting requests in at once."""
    host = loaded(Gated)

    async def main():
        running, waiting = await one_running_one_waiting(host)
        host.config = parse_config("runtime: {predict_concurrency: 1}\n")
        more = asyncio.ensure_future(host.predict({"i": 2}))
        await asyncio.sleep(0.05)
        assert host.instance.calls == [0]
        host.config = parse_config("runtime: {predict_concurrency: 3}\n")
        assert await asyncio.wait_for(asyncio.gather(waiting, more), 10) == [1, 2]  # beside the first, still held
        host.config = parse_config("runtime: {predict_concurrency: 1}\n")
        host.instance.gate.set()
        return await running

    assert asyncio.run(main()) == 0
    assert host.instance.peak >= 2 and sorted(host.instance.calls) == [0, 1, 2]
    slots, deadline = host._slots[1], time.monotonic() + 10
    while slots._free != 1 and time.monotonic() < deadline:  # (a worker hands its slot on just after its answer)
        time.sleep(0.01)
    assert (slots.size, slots._free) == (1, 1)  # the three slots given back to a bound of one


@pytest.mark.parametrize("is_async", [False, True])
def test_a_request_whose_caller_left_while_it_waited_never_runs(is_async):
    """(An HTTP client that timed out while the model was busy: Truss skips its predict with a 499.) A request whose
    caller leaves once its predict has started runs to its end."""
    from kernel_magics.core.slots import CallerGone

    gates = {0: threading.Event(), 2: threading.Event()}
    started = {i: threading.Event() for i in range(3)}
    calls = []

    def work(x):
        calls.append(x)
        started[x].set()
        if x in gates:
            assert gates[x].wait(10)
        return x

    class Sync:
        def predict(self, x):
            return work(x)

    class Async:
        async def predict(self, x):
            return await asyncio.to_thread(work, x)

    host = loaded(Async if is_async else Sync)

    async def main():
        left = {i: asyncio.Event() for i in range(3)}
        tasks = [asyncio.ensure_future(host.predict(i, gone=left[i].wait)) for i in range(3)]
        assert await asyncio.to_thread(started[0].wait, 10)
        await asyncio.sleep(0.2)  # 1 and 2 wait long enough to be watched
        left[1].set()  # waiting: it leaves the queue
        with pytest.raises(CallerGone):
            await asyncio.wait_for(tasks[1], 10)
        gates[0].set()
        assert await asyncio.to_thread(started[2].wait, 10)
        left[2].set()  # running: it answers all the same
        await asyncio.sleep(0.1)
        gates[2].set()
        return [await tasks[0], await tasks[2]]

    assert asyncio.run(main()) == [0, 2]
    assert calls == [0, 2]


def test_a_loop_that_stopped_with_the_slot_taken_does_not_hold_up_the_next_one():
    """The kernel's runner stops (%unload_ext) while a predict holds the slot on it; the next %model_predict runs on
    a new loop."""
    import concurrent.futures

    from kernel_magics.core.loop import BackgroundLoop

    class M:
        async def predict(self, x):
            await asyncio.sleep(0.5 if x == 0 else 0)
            return x

    host = loaded(M)
    runner = BackgroundLoop()
    runner.submit(host.predict(0))
    time.sleep(0.1)
    runner.stop()
    try:
        assert runner.submit(host.predict(1)).result(timeout=10) == 1
    except concurrent.futures.TimeoutError:
        pytest.fail("the next predict waited for a slot held on the stopped loop")
    finally:
        runner.stop()


def test_error_mid_stream_propagates_after_the_chunks_before_it():
    class M:
        def predict(self, x):
            yield "a"
            raise RuntimeError("boom")

    host = loaded(M)

    async def main():
        got = []
        with pytest.raises(RuntimeError, match="boom"):
            async with await host.predict({}) as stream:
                async for chunk in stream:
                    got.append(chunk)
        return got

    assert asyncio.run(main()) == ["a"]


def test_a_stream_that_ran_to_its_end_takes_one_thread_hop_a_chunk_and_none_to_close():
    """Each chunk is one next() in a worker thread, and so is the end; closing a generator that ended runs nothing,
    so it is closed on the loop (a thread hop costs more than a short stream's chunks). One stopped early is
    closed in a worker thread: its ``finally`` may block."""
    import concurrent.futures

    class Counting(concurrent.futures.ThreadPoolExecutor):
        def __init__(self):
            super().__init__(2)
            self.jobs = []

        def submit(self, fn, /, *args, **kwargs):
            self.jobs.append(args[0].__name__ if fn.__name__ == "run" else fn.__name__)  # ctx.run(_advance, gen)
            return super().submit(fn, *args, **kwargs)

    events = []

    def gen(n, fail=False):
        try:
            for i in range(n):
                yield str(i)
            if fail:
                raise ValueError("the model failed mid-stream")
        finally:
            events.append(threading.current_thread() is threading.main_thread())

    async def main(generator, take):
        pool, closed = Counting(), []
        stream = ChunkStream(generator, on_close=closed.append, started=0.0, executor=pool)
        got = []
        try:
            async with stream:
                if take != 0:  # (0: closed before its first chunk)
                    async for chunk in stream:
                        got.append(chunk)
                        if len(got) == take:
                            break
        except ValueError:
            got.append("raised")
        pool.shutdown()
        return got, pool.jobs, closed == [stream]

    assert asyncio.run(main(gen(3), None)) == (["0", "1", "2"], ["_advance"] * 4, True)  # three chunks, the end; no close
    assert asyncio.run(main(gen(3), 1)) == (["0"], ["_advance", "close_quietly"], True)  # stopped early: closed in a thread
    assert asyncio.run(main(gen(1, fail=True), None)) == (["0", "raised"], ["_advance"] * 2, True)  # raised: it ended
    assert asyncio.run(main(gen(3), 0)) == ([], [], True)  # never started: its close runs nothing at all
    assert events == [False, False, False]  # every `finally` that ran, ran in a worker thread


def test_a_stream_closed_early_runs_its_finally_in_the_closers_context():
    """What the model's `finally` logs when the server stops its stream carries the request's id (a context
    variable), as its chunks' lines do."""
    import contextvars

    request_id = contextvars.ContextVar("request_id", default=None)
    seen = []

    def gen():
        try:
            yield "a"
            yield "b"
        finally:
            seen.append(request_id.get())

    async def main():
        request_id.set("req-7")
        stream = ChunkStream(gen(), on_close=lambda s: None, started=0.0)
        async with stream:
            async for _ in stream:
                break  # the reader leaves after the first chunk: the server closes the generator

    asyncio.run(main())
    assert seen == ["req-7"]


# ---------------------------------------------------------------- hot reload

def test_hot_swap_keeps_the_instance_and_its_state():
    class V1:
        def load(self):
            self.weights = object()

        def predict(self, x):
            return "v1"

    host = loaded(V1)
    instance, weights = host.instance, host.instance.weights

    class V2:
        def load(self):
            self.weights = object()

        def predict(self, x):
            return "v2"

    report = host.define(V2)
    assert report.hot_swapped and report.changed == ()
    assert host.instance is instance and host.instance.weights is weights
    assert collect(host, {}) == "v2"


def test_hot_swap_reports_a_changed_load():
    class V1:
        def load(self):
            self.w = 1

        def predict(self, x):
            return self.w

    host = loaded(V1)

    class V2:
        def load(self):
            self.w = 2

        def predict(self, x):
            return self.w

    report = host.define(V2)
    assert report.changed == ("load",) and report.needs_reload
    assert collect(host, {}) == 1  # old weights until the user reloads
    host.load()
    assert collect(host, {}) == 2


def test_a_bad_redefinition_keeps_the_old_model():
    class Good:
        def predict(self, x):
            return "good"

    host = loaded(Good)
    with pytest.raises(ModelDefinitionError):
        host.define(type("Model", (), {}))
    assert collect(host, {}) == "good"


# ---------------------------------------------------------------- secrets

def test_secret_values_come_from_the_environment_and_errors_name_the_variable(monkeypatch):
    store = SecretStore(["tok", "other"])
    monkeypatch.setenv("TRUSS_SECRET_tok", "s3cret-CANARY")
    monkeypatch.delenv("TRUSS_SECRET_other", raising=False)
    assert store["tok"] == "s3cret-CANARY"
    with pytest.raises(SecretNotFound, match="TRUSS_SECRET_other"):
        store["other"]
    with pytest.raises(SecretNotFound, match="not declared"):
        store["nope"]
    assert "CANARY" not in repr(store)
    store.set_value("other", "in-memory")
    assert store["other"] == "in-memory"
    assert store.source_of("other") == "set in this session"


def test_secrets_dir_like_truss_mount(tmp_path):
    (tmp_path / "tok").write_text("from-file")
    assert SecretStore(["tok"], secrets_dir=tmp_path)["tok"] == "from-file"
