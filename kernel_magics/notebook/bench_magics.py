"""``%model_bench``: how fast will this model serve? A load test of the live model, shown as lines and a plot."""

from __future__ import annotations

import re
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments

from ..core.runtime import ModelState
from .magics import ModelMagics, allows_comment

__all__ = ["BenchMagics"]

_FLAG = re.compile(r"--(?P<flag>[\w-]+)(?:[ \t]+|=)(?P<value>\S+)")
_LIMITS = {"concurrency": 1024, "requests": 1_000_000, "duration": 3600}


@magics_class
class BenchMagics(Magics):
    """%model_bench."""

    def __init__(self, shell, model: ModelMagics) -> None:
        super().__init__(shell)
        self.model = model

    @magic_arguments()
    @argument("--concurrency", default="1,8,32", help="Comma-separated levels of concurrent callers (default 1,8,32).")
    @argument("--requests", default="200", help="At most this many requests per level (default 200).")
    @argument("--duration", default="10", help="At most this many seconds per level (default 10).")
    @argument("input", nargs="*", help='The model input each request sends: JSON, or a Python expression.')
    @no_var_expand
    @line_magic
    @allows_comment
    def model_bench(self, line: str):
        """Load-test the loaded model in-process, through the same runtime as the server (no HTTP): at each
        concurrency level, callers send the input back to back until the request count or the time limit.
        Shows requests/s, p50/p99 latency and the batch sizes the model ran, with a plot, and says whether
        the model would gain from batching. Interrupt (Stop) ends it with what was measured so far.

            %model_bench {"text": "A notebook model, served."}
            %model_bench --concurrency 1,32 --requests 500 --duration 20 my_input
        """
        from ..core.load_test import advice, format_level, plot_png, run_bench

        options, text = self._parse(line)
        model, host = self.model, self.model.host
        if not text:
            raise UsageError("Usage: %model_bench [--concurrency 1,8,32] [--requests N] [--duration S] INPUT, where "
                             'INPUT is what one request sends: JSON like {"text": "hi"}, or a Python expression.')
        model_input = self.shell.magics_manager.registry["RunMagics"]._parse_input(text)
        model.wait_for_background_load()
        if host.state is not ModelState.READY:
            raise UsageError("No model is loaded: run %model_load first, then %model_bench.")
        levels: list = []

        def shown(level) -> None:
            levels.append(level)
            print(format_level(level), flush=True)

        print(f"Benchmarking `{host.config.model_class_name}` in-process at concurrency "
              f"{', '.join(map(str, options['concurrency']))}: up to {options['requests']} requests or "
              f"{options['duration']:g} s per level.", flush=True)
        try:
            model.run(model.runner.run, run_bench(host, model_input, options["concurrency"], options["requests"],
                                                  options["duration"], on_level=shown))
        except KeyboardInterrupt:
            print("Stopped: the levels above were measured in full.")
        contract = host.contract
        tip = advice(levels, batches=contract.predict_batch is not None, streams=contract.predict.is_generator)
        if tip:
            print(tip)
        png = plot_png(levels, title=f"{host.config.model_class_name}, in-process")
        if png is not None:
            from IPython.display import Image, display

            display(Image(data=png, format="png"))
        elif levels:
            print("(Install matplotlib for the plot.)")
        return None

    def _parse(self, line: str) -> tuple[dict[str, Any], str]:
        """Leading ``--flag value`` pairs (the input after them may hold any characters)."""
        options: dict[str, Any] = {"concurrency": [1, 8, 32], "requests": 200, "duration": 10.0}
        rest = line.strip()
        while rest.startswith("--"):
            match = _FLAG.match(rest)
            flag = match["flag"] if match else rest.split()[0][2:]
            if flag not in _LIMITS:
                raise UsageError(f"Unknown option --{flag} for %model_bench. Options: --concurrency 1,8,32, "
                                 "--requests N, --duration SECONDS (see %model_bench?).")
            if match is None:
                raise UsageError(f"--{flag} needs a value, for example --{flag} "
                                 f"{ {'concurrency': '1,8,32', 'requests': '200', 'duration': '10'}[flag] }.")
            options[flag] = _value(flag, match["value"])
            rest = rest[match.end():].lstrip()
        return options, rest


def _value(flag: str, text: str) -> Any:
    limit = _LIMITS[flag]
    try:
        if flag == "concurrency":
            values = [int(v) for v in text.split(",") if v.strip()]
            ok = bool(values) and all(1 <= v <= limit for v in values)
            value: Any = sorted(set(values))
        elif flag == "requests":
            value = int(text)
            ok = 1 <= value <= limit
        else:
            value = float(text)
            ok = 0 < value <= limit
    except ValueError:
        ok = False
    if not ok:
        what = {"concurrency": f"comma-separated whole numbers from 1 to {limit}, like 1,8,32",
                "requests": f"a whole number from 1 to {limit:,}",
                "duration": f"a number of seconds above 0, at most {limit}"}[flag]
        raise UsageError(f"--{flag} {text}: it must be {what}.")
    return value
