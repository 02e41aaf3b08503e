"""The live value is the judge: every name model.py re-runs from source is compared with the kernel's.

Reading the code cannot see an alias (``cols = FEATURES; cols.append(...)``), a function or an
awaited coroutine that fills a global, a file deleted since, or a changed attribute of a module
beside the notebook. So the export's fresh-process check fingerprints each name model.py rebuilds
from source (:mod:`fingerprint`), and :class:`Verification` compares them with the kernel's live
values: a name that differs is planned again as a value (with the measured difference as its
reason, which ``%model_show --why`` shows), the directory is written again and checked again. The
check stays the judge: its replay of the notebook's predictions decides.

Two kinds of difference are not moved: a value that predict itself changes (a random generator, a
cache), whose fresh state after the replay equals the live one, keeps its source (the source gives
the state the model started from, the replay proves it); and a value without a fingerprint (it
cannot be pickled) is not verified: it stays source, ``%model_show --why`` and the export's output name it,
and the replay is its only proof. When a replay differs anyway, :meth:`Verification.measured_cause`
names the values whose fresh fingerprints differ from the live ones, and what predict changes.

What one kernel learned is remembered (by the live value's fingerprint, so a changed value is judged
again): the next export or ``%model_show --why`` plans those names as values at once.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

from .fingerprint import BESIDES_WEIGHTS, changed_attributes, difference, fingerprint, same, type_name

__all__ = ["Verification", "remembered"]

_MAX_ROUNDS = 4  # each round moves at least one name to the values; it ends sooner in practice
# id(live namespace) -> name -> (live digest, reason, the %%model cell's text): a re-run's value also depends on which
# definitions model.py holds (a class registry that a class the model did not use filled), so an edited model cell
# is judged again
_LEARNED: dict[int, dict[str, tuple[str, str, str]]] = {}


def _resolve(live: Mapping[str, Any], name: str) -> Any:
    head, _, attr = name.partition(".")
    value = live[head]
    return getattr(value, attr) if attr else value


def remembered(live: Optional[Mapping[str, Any]], model_cell: str = "") -> dict[str, str]:
    """The names earlier verifications in this kernel found different, whose live values (and the %%model cell)
    are unchanged since."""
    if live is None:
        return {}
    out = {}
    for name, (digest, reason, cell) in list(_LEARNED.get(id(live), {}).items()):
        try:
            now = fingerprint(_resolve(live, name))
        except (KeyError, AttributeError):
            now = None
        if now is not None and now["digest"] == digest and cell == model_cell:
            out[name] = reason
        else:
            del _LEARNED[id(live)][name]
    return out


class Verification:
    """Runs the fresh-process check until the names re-run from source agree with the live values."""

    def __init__(self, materialized: Any, rewrite: Callable[[Any], None]) -> None:
        self.materialized = materialized
        self.rewrite = rewrite  # writes the build again for a new plan
        # (the build already fingerprinted the names re-run from source: not hashed a second time)
        self.live_fingerprints: dict[str, Optional[dict]] = dict(materialized.source.fingerprints)
        self.seconds = 0.0
        self.tried: set[str] = set()  # names already moved to the values

    # ------------------------------------------------------------------ what is compared

    def _names(self) -> list[str]:
        """Names re-run from source, and random generators that travel as values (to tell what predict changes)."""
        from .values import stateful_kind

        source = self.materialized.source
        live = self.materialized.live
        names = list(source.verify)
        for inc in source.included:
            if inc.travels == "value" and inc.name in live and "random generator" in (stateful_kind(live[inc.name]) or ""):
                names.append(inc.name)
        return names

    def _key(self, name: str) -> str:
        """What the fresh process is asked to fingerprint for ``name`` (a module sent as its weights: all but them)."""
        return name + BESIDES_WEIGHTS if name in self.materialized.source.besides_weights else name

    def _live(self, name: str) -> Optional[dict]:
        if name not in self.live_fingerprints:
            started = time.perf_counter()
            weights = name not in self.materialized.source.besides_weights
            self.live_fingerprints[name] = fingerprint(self.materialized.live[name], weights=weights)
            self.seconds += time.perf_counter() - started
        return self.live_fingerprints[name]

    def _reference(self, name: str, report: Any) -> Optional[dict]:
        """What the fresh value of ``name`` must match: the live value, or, for a value the notebook's load()
        changed when the check did not load, its value from before that load (load_snapshot.py)."""
        if "load" not in report.stages and name not in self.materialized.source.besides_weights:
            from .load_snapshot import before_fingerprint

            before = before_fingerprint(self.materialized.live, name)
            if before is not None:
                return before
        return self._live(name)

    # ------------------------------------------------------------------ the loop

    def run(self, check: Callable[[list[str]], tuple]) -> tuple:
        """``check(names)`` runs the fresh process fingerprinting ``names`` and returns (report, truss)."""
        report, truss = None, None
        for rounds in range(1, _MAX_ROUNDS + 1):
            if self.materialized.live is None:  # the CLI: no live values (it refuses what it cannot prove)
                return check([])
            names = self._names()
            for name in names:
                self._live(name)
            report, truss = check([self._key(name) for name in names])
            report.stages["verify live"] = self.seconds
            report.stages["verify rounds"] = rounds  # fresh processes run: 1 unless something moved to the values
            differ = self._differences(report)
            if not differ or set(differ) <= set(self.tried):
                break  # agreed, or nothing more a new plan could change: the replay judges
            self.tried.update(differ)
            live = self.materialized.live
            learned = _LEARNED.setdefault(id(live), {})
            for name, reason in differ.items():
                whole = "." in name or name in self.materialized.source.besides_weights  # (as remembered() reads it)
                found = fingerprint(_resolve(live, name)) if whole else self._live(name)
                if found is not None:
                    learned[name] = (found["digest"], reason, self.materialized.model_cell)
            self.materialized = self.materialized.rebuild(differ)
            self.rewrite(self.materialized)
        return report, truss

    def _differences(self, report: Any) -> dict[str, str]:
        """Names to move to the values, with why (measured)."""
        source = self.materialized.source
        differ: dict[str, str] = {}
        line = getattr(report, "model_line", None)
        if report.error and line:
            name = source.name_at_line(line)
            if name is not None:  # re-running its statement fails here (a file deleted since, ...)
                differ[name] = f"re-running its source fails in a fresh Python ({report.error})"
                return differ
        start = report.fingerprints.get("start", {})
        after = report.fingerprints.get("after_replay", {})
        for name in source.verify:
            live, fresh = self._reference(name, report), start.get(self._key(name))
            if live is None or fresh is None or same(live, fresh):
                continue
            if live.get("kind") == "module":
                for attr in changed_attributes(live, fresh):
                    why = difference(live["items"][attr], fresh["items"][attr])
                    differ[f"{name}.{attr}"] = f"the notebook changed it, and importing {name} afresh gives " + (
                        why.replace("re-running its source gives ", "", 1))
                continue
            if same(live, after.get(self._key(name))):
                continue  # predict changes it, and the replay from its source state ends where the notebook is
            if live.get("kind") == "random" and report.replayed:
                continue  # predict consumes it: its source gives the starting state; the replay judges
            differ[name] = difference(live, fresh)
        return differ

    def notes(self, replayed: int) -> list[str]:
        """Warnings for the export's output: the names re-run from source that could not be verified."""
        live = self.materialized.live
        if live is None:
            return []
        names = [n for n in self.materialized.source.verify if n in live and self.live_fingerprints.get(n, {}) is None]
        if not names:
            return []
        what = ", ".join(f"`{n}` (a {type_name(live[n])})" for n in names)
        their = "their" if len(names) > 1 else "its"
        proof = (f"the replay of {replayed} recorded prediction{'s' if replayed != 1 else ''} is {their} only proof"
                 if replayed else "no recorded prediction proves it: run %model_predict before exporting")
        return [f"{what} {'travel' if len(names) > 1 else 'travels'} as source without being verified against the "
                f"notebook (a value that cannot be pickled has no fingerprint to compare); {proof}."]

    def measured_cause(self, report: Any) -> "Optional[MismatchHint]":
        """When a replay differs: the values whose fresh fingerprints differ from the live ones, what
        predict changes, and what to do about it (None when every verified value agrees)."""
        from .export import MismatchHint

        live_ns = self.materialized.live
        if live_ns is None:
            return None
        source = self.materialized.source
        travels = {inc.name: inc.travels for inc in source.included}
        start = report.fingerprints.get("start", {})
        after = report.fingerprints.get("after_replay", {})
        causes: list[str] = []
        remedies: list[str] = []
        for name in self._names():
            key = self._key(name)
            live, fresh, later = self.live_fingerprints.get(name), start.get(key), after.get(key)
            what = f"`{name}` (a {type_name(live_ns[name])})"
            if fresh is not None and later is not None and not same(fresh, later):
                if travels.get(name) == "value":
                    causes.append(f"{what} changes each time predict runs, and the export saves it as it is now, after "
                                  "the notebook's predictions, so the replay cannot start from the state they started "
                                  "from")
                    remedy = "Create (and seed) it inside load(), or pass a seed with each request"
                else:
                    causes.append(f"{what} changes each time predict runs: the export starts from its source's state, "
                                  "the notebook's predictions started from another")
                    remedy = "Create (and seed) it inside load()"
                if remedy not in remedies:
                    remedies.append(remedy)
            elif live is not None and fresh is not None and not same(live, fresh):
                causes.append(f"{what}: {difference(live, fresh)}")
        if not causes:
            return None
        return MismatchHint("; ".join(causes), "; ".join(remedies) + ", then export again") if remedies else \
            MismatchHint("; ".join(causes))
