"""core/collector.py's pause of automatic collections around an import, in this process (the freeze is tested on a
real server, tests/test_server.py: freezing pytest's own objects would outlive the test)."""

import gc

import pytest

from kernel_magics.core.collector import imports_uncollected


@pytest.fixture
def collections():
    """The generations of the collections that start while a test runs; the collector's settings restored."""
    started: list = []

    def note(phase, info):
        if phase == "start":
            started.append(info["generation"])

    threshold, enabled = gc.get_threshold(), gc.isenabled()
    gc.enable()
    gc.callbacks.append(note)
    yield started
    gc.callbacks.remove(note)
    gc.set_threshold(*threshold)
    (gc.enable if enabled else gc.disable)()


def make_cycles(n: int = 20_000) -> None:
    for _ in range(n):
        node = {}
        node["me"] = node


def test_no_automatic_collection_inside_and_the_threshold_comes_back(collections):
    before = gc.get_threshold()
    with imports_uncollected():
        assert gc.get_threshold()[0] == 0
        make_cycles()
        assert collections == []
    assert gc.get_threshold() == before
    make_cycles()
    assert collections, "automatic collections did not resume"


def test_an_exception_inside_restores_the_threshold(collections):
    before = gc.get_threshold()
    with pytest.raises(ImportError):
        with imports_uncollected():
            raise ImportError("model.py forgot a package")
    assert gc.get_threshold() == before


def test_nested_pauses_restore_the_outer_state(collections):
    before = gc.get_threshold()
    with imports_uncollected():
        with imports_uncollected():
            pass
        assert gc.get_threshold()[0] == 0
    assert gc.get_threshold() == before


def test_a_model_py_that_sets_the_collector_itself_keeps_its_settings(collections):
    """As under Truss's server, which pauses nothing: model.py's own gc.disable() or thresholds stay."""
    with imports_uncollected():
        gc.disable()
    assert not gc.isenabled()
    gc.enable()
    with imports_uncollected():
        gc.set_threshold(5000, 20, 20)
    assert gc.get_threshold() == (5000, 20, 20)
