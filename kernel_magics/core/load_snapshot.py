"""What the notebook's ``load()`` changed in its globals: exported as they were before ``%model_load``.

A ``load()`` that changes a notebook global (``LABELS.append("extra")``, ``CACHE.clear()``,
``global COUNT; COUNT += 1``) leaves the kernel's value as load left it. Saved that way, the
deployment's ``load()`` changes it a second time (3 labels in the notebook, 4 deployed). So
``%model_load`` records, when it starts, the globals the model's code uses (a fingerprint, and a
deep copy when it is small enough), and again when load ends; an export plans each name that load
changed from the value it had before the load (:func:`planning_view`), so the deployment's load
starts where the notebook's started. One too large to copy is refused naming it and the line in
``load()`` that changes it. A name rebound since the load (a cell ran again) is the notebook's new
value and is planned as it is.
"""

from __future__ import annotations

import copy
import pickle
import sys
import threading
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Iterable, Optional

from .fingerprint import fingerprint, same
from .source import MaterializeError

__all__ = ["before_load", "after_load", "planning_view", "before_fingerprint", "changed_by_load", "changed_since_load",
           "where_load_changes", "COPY_LIMIT"]

COPY_LIMIT = 64 * 2**20  # bytes: a bigger value is fingerprinted, not copied (a copy costs memory at every load)
TOTAL_COPY_LIMIT = 256 * 2**20  # bytes, all copies of one load together
FINGERPRINT_LIMIT = 512 * 2**20  # bytes: a bigger value is not followed at all (hashing it would slow every load)
_SNAPSHOTS: dict[int, "_Snapshot"] = {}  # id(live namespace) -> the last load's snapshot
_LOCK = threading.Lock()


@dataclass
class _Snapshot:
    names: list[str]
    objects: dict[str, Any]  # the objects bound when load started (kept alive, so identity checks hold)
    before: dict[str, Optional[dict]]  # their fingerprints then
    copies: dict[str, Any]  # deep copies of the values when load started (the small ones)
    where: dict[str, str]  # name -> the statement in load() that changes it, as the user reads it
    after: Optional[dict[str, Any]] = None  # the objects bound when load ended
    changed: set[str] = field(default_factory=set)
    unfollowed: set[str] = field(default_factory=set)  # too big to fingerprint; load() visibly changes them
    after_prints: dict[str, Optional[dict]] = field(default_factory=dict)  # the changed ones' fingerprints then


_PLAIN = frozenset({str, bytes, bool, int, float, complex, type(None)})


def _nbytes(value: Any, depth: int = 0) -> int:
    """A cheap estimate of the bytes a value holds (arrays, tensors, module weights, containers of them)."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if type(value) in _PLAIN:
        return 8
    np = sys.modules.get("numpy")
    torch = sys.modules.get("torch")
    if np is not None and isinstance(value, np.ndarray):
        return int(value.nbytes)
    if torch is not None:
        if isinstance(value, torch.Tensor):
            return int(value.nelement() * value.element_size())
        if isinstance(value, torch.nn.Module):
            return sum(int(t.nelement() * t.element_size()) for t in value.state_dict().values())
    if depth > 3:
        return 0
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        # The first 10,000 items, scaled to the whole: a 2 GB list of strings or floats is as big as an array.
        items = list(value.items() if isinstance(value, dict) else value)[:10_000]
        if not items:
            return 0
        sample = sum(_nbytes(item, depth + 1) for item in items)  # (a dict's item is a (key, value) tuple)
        return sample * len(value) // len(items)
    attrs = getattr(value, "__dict__", None)
    if isinstance(attrs, dict) and not isinstance(value, type):
        return sum(_nbytes(v, depth + 1) for v in list(attrs.values())[:1_000])
    return 0


def before_load(live: dict, names: Iterable[str], where: Mapping[str, str] = {}) -> None:
    """At the start of ``%model_load``: remember the values of ``names`` (the globals the model uses)."""
    names = [n for n in names if n in live]
    objects = {n: live[n] for n in names}
    sizes = {n: _nbytes(v) for n, v in objects.items()}
    followed = [n for n in names if sizes[n] <= FINGERPRINT_LIMIT]
    # Too big to follow, but load() visibly changes it (`W *= 2`): counted as changed, so the export refuses it
    # naming the statement, instead of saving it as load left it.
    unfollowed = [n for n in names if sizes[n] > FINGERPRINT_LIMIT and where.get(n)]
    small, total = {}, 0
    for n in sorted(followed, key=lambda n: sizes[n]):  # the smallest first, up to TOTAL_COPY_LIMIT in all
        if sizes[n] <= COPY_LIMIT and total + sizes[n] <= TOTAL_COPY_LIMIT:
            small[n] = objects[n]
            total += sizes[n]
    from .values import is_literal

    literal = {n: v for n, v in small.items() if is_literal(v)}
    small = {n: v for n, v in small.items() if n not in literal}
    try:
        # Plain data through pickle (several times faster than deepcopy), the rest with deepcopy in one go:
        # names bound to one object stay one object.
        copies = {**pickle.loads(pickle.dumps(literal, protocol=pickle.HIGHEST_PROTOCOL)), **copy.deepcopy(small)}
    except Exception:
        copies = {}
        for n, v in {**literal, **small}.items():
            try:
                copies[n] = copy.deepcopy(v)
            except Exception:
                pass  # cannot be copied (a lock ...): a change by load is refused, naming it
    snapshot = _Snapshot(followed + unfollowed, {n: objects[n] for n in followed + unfollowed},
                         {n: fingerprint(objects[n]) for n in followed}, copies, dict(where), unfollowed=set(unfollowed))
    with _LOCK:
        _SNAPSHOTS[id(live)] = snapshot


def after_load(live: dict) -> None:
    """When load ends (finished or failed): which of the remembered globals it changed."""
    with _LOCK:
        snapshot = _SNAPSHOTS.get(id(live))
    if snapshot is None or snapshot.after is not None:
        return
    after = {n: live.get(n) for n in snapshot.names}
    changed = set()
    for n in snapshot.names:
        if n in snapshot.unfollowed:
            if n in live:
                changed.add(n)
            continue
        before, now = snapshot.before[n], fingerprint(after[n])
        # (a value without a fingerprint, which cannot be pickled, counts as changed only when load rebinds it)
        if after[n] is not snapshot.objects[n] or (before is not None and not same(before, now)):
            if n in live:
                changed.add(n)
                snapshot.after_prints[n] = now
    snapshot.after, snapshot.changed = after, changed
    snapshot.objects = {}  # (only needed to tell what load rebound: not kept alive any longer)


def _current(live: Mapping[str, Any]) -> Optional[_Snapshot]:
    with _LOCK:
        return _SNAPSHOTS.get(id(live))


def changed_by_load(live: Optional[Mapping[str, Any]]) -> list[str]:
    """The names the last load changed and that still hold the object load left (no cell rebound them since)."""
    snapshot = _current(live) if live is not None else None
    if snapshot is None or snapshot.after is None:
        return []
    return [n for n in snapshot.names if n in snapshot.changed and n in live and live[n] is snapshot.after[n]]


def before_fingerprint(live: Optional[Mapping[str, Any]], name: str) -> Optional[dict]:
    """The fingerprint ``name`` had when the last load started, when that load changed it (else None)."""
    if name not in changed_by_load(live):
        return None
    return _current(live).before.get(name)


def changed_since_load(live: Optional[Mapping[str, Any]], among: Iterable[str]) -> list[str]:
    """The names (of ``among``) the last load changed whose value may have changed again since it ended (measured:
    a cell, or predict filling a cache; one without a fingerprint, which cannot be measured, counts); the export
    plans them from before the load all the same."""
    snapshot = _current(live) if live is not None else None
    among = set(among)
    found = []
    for n in (n for n in changed_by_load(live) if n in among):
        then = snapshot.after_prints.get(n)
        now = fingerprint(live[n]) if then is not None else None
        if then is None or now is None or not same(then, now):
            found.append(n)
    return found


def where_load_changes(live: Mapping[str, Any], name: str) -> str:
    """The statement in load() that changes ``name``, as the user reads it (or where else it may be)."""
    snapshot = _current(live)
    return (snapshot.where.get(name) if snapshot is not None else None) or "in load() or a function it calls"


class _BeforeLoad(Mapping):
    """The live namespace with the names load changed bound to their values from before the load."""

    def __init__(self, live: Mapping[str, Any], snapshot: _Snapshot, names: list[str]) -> None:
        self.live, self.snapshot = live, snapshot
        self.copies = {n: snapshot.copies[n] for n in names if n in snapshot.copies}
        self.uncopied = {n for n in names if n not in snapshot.copies}

    def __getitem__(self, name: str) -> Any:
        if name in self.copies:
            return self.copies[name]
        if name in self.uncopied:
            raise self._refusal(name)
        return self.live[name]

    def __contains__(self, name: object) -> bool:
        return name in self.live

    def __iter__(self):
        return iter(self.live)

    def __len__(self) -> int:
        return len(self.live)

    def items(self):  # (what a pickler looks names up in: no refusal for a name it only passes by)
        return [(n, self.copies.get(n, v)) for n, v in list(self.live.items())]

    def _refusal(self, name: str) -> MaterializeError:
        where = where_load_changes(self.live, name)
        return MaterializeError(
            f"The model uses `{name}` (a {type(self.live[name]).__name__}), which %model_load changed ({where}); "
            f"it is too large to keep a copy of from before the load (over {COPY_LIMIT // 2**20} MB, or "
            f"{TOTAL_COPY_LIMIT // 2**20} MB for all the globals the model uses) or cannot be copied, so the "
            "export cannot save the value the deployment's load() must start from (saved as load left it, the "
            "deployment's load() would change it a second time). In load(), change a value of the model's own"
            f" (`self.{name.lower()} = ...`) rather than the notebook's `{name}`, or export before "
            "%model_load.")


def planning_view(live: Optional[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
    """``live`` with every name that load changed bound to its value from before the load; reading one that
    could not be copied raises MaterializeError naming it and the line in load() that changes it."""
    if live is None:
        return None
    names = changed_by_load(live)
    if not names:
        return live
    return _BeforeLoad(live, _current(live), names)
