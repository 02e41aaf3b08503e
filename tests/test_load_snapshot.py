"""core/load_snapshot.py without a kernel: what %model_load remembers of the globals the model uses, and what an
export is refused when it cannot know the value from before the load."""

import pytest

from kernel_magics.core import load_snapshot
from kernel_magics.core.source import MaterializeError


def _load(live: dict, where: dict, change) -> object:
    load_snapshot.before_load(live, list(where), where)
    change(live)
    load_snapshot.after_load(live)
    return load_snapshot.planning_view(live)


def test_a_small_global_that_load_changes_is_planned_as_it_was_before_the_load():
    live = {"LABELS": ["cat", "dog"]}
    view = _load(live, {"LABELS": "LABELS.append('bird') in load()"}, lambda g: g["LABELS"].append("bird"))
    assert view["LABELS"] == ["cat", "dog"] and live["LABELS"] == ["cat", "dog", "bird"]


def test_a_large_string_counts_its_size_and_is_refused_instead_of_copied(monkeypatch):
    """A str (or a list of them) held 0 bytes in the size estimate: every load copied it whatever its size."""
    monkeypatch.setattr(load_snapshot, "COPY_LIMIT", 2**20)
    for big in ("x" * 2_000_000, ["y" * 1000] * 2000):
        live = {"BIG": big}
        view = _load(live, {"BIG": "BIG = BIG * 2 in load()"}, lambda g: g.__setitem__("BIG", g["BIG"] * 2))
        with pytest.raises(MaterializeError, match="`BIG`.*BIG = BIG \\* 2 in load\\(\\).*too large"):
            view["BIG"]


def test_a_global_too_big_to_follow_that_load_visibly_changes_is_refused(monkeypatch):
    """Over the fingerprint limit a global was not followed at all: load's change went unseen and the export saved
    it as load left it (the deployment's load() changes it a second time)."""
    np = pytest.importorskip("numpy")
    monkeypatch.setattr(load_snapshot, "FINGERPRINT_LIMIT", 4096)
    live = {"W": np.ones(1024), "V": np.ones(1024)}
    view = _load(live, {"W": "W *= 2 in load()", "V": ""}, lambda g: g["W"].__imul__(2))
    with pytest.raises(MaterializeError, match="`W`.*W \\*= 2 in load\\(\\)"):
        view["W"]
    assert view["V"] is live["V"]  # not changed visibly, not followed: planned as it is
