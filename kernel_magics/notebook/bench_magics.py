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

# `--flag value` or `--flag=value`; a comma-separated value may have spaces after its commas (`1, 8, 32`).
_FLAG = re.compile(r"--(?P<flag>[\w-]+)(?=[ \t=]|$)")
_VALUE = re.compile(r"(?:[ \t]+|=)(?P<value>[^\s,]+(?:[ \t]*,[ \t]*[^\s,]+)*,?)")
_LIMITS = {"concurrency": 1024, "requests": 1_000_000, "duration": 3600}


@magics_class
class BenchMagics(Magics):
    """%model_bench."""

    def __init__(self, shell, model: ModelMagics) -> None:
        super().__init__(shell)
        self.model = model

    # The options are read by _parse (the input after them may hold any characters, which argparse would split);
    # these declarations are its table, so the help, the usage line and the parser cannot disagree.
    @magic_arguments()
    @argument("--concurrency", default="1,8,32", metavar="1,8,32",
              help="Comma-separated levels of concurrent callers (default 1,8,32).")
    @argument("--requests", default="200", metavar="N", help="At most this many requests per level (default 200).")
    @argument("--duration", default="10", metavar="S", help="At most this many seconds per level (default 10).")
    @argument("--http", action="store_true",
              help="Send the requests over HTTP to the server %%model_serve runs in this kernel (one keep-alive "
                   "connection per caller), so the server's own cost is measured too.")
    @argument("input", nargs="*", metavar="INPUT",
              help='The model input each request sends: JSON, or a Python expression.')
    @no_var_expand
    @line_magic
    @allows_comment
    def model_bench(self, line: str):
        """Load-test the loaded model in-process, through the same runtime as the server (no HTTP): at each
        concurrency level, callers send the input back to back until the request count or the time limit.
        Shows requests/s, p50/p99 latency and the batch sizes the model ran, with a plot, and says whether
        the model would gain from batching. Interrupt (Stop) ends it with what was measured so far.

        With --http, the same levels send real HTTP POSTs to the server %model_serve started in this kernel
        (run it first), one keep-alive connection per caller: the numbers then include HTTP and the server.
        An answer with an error status counts as a failed request.

            %model_bench {"text": "A notebook model, served."}
            %model_bench --concurrency 1,32 --requests 500 --duration 20 my_input
            %model_serve --port 0
            %model_bench --http {"text": "A notebook model, served."}
        """
        from ..core.load_test import InProcess, OverHTTP, advice, format_level, plot_png, run_bench
        from .ship_magics import _InKernel

        options, text = self._parse(line)
        model, host = self.model, self.model.host
        if not text:
            raise UsageError(f"Usage: {self._usage()}, where INPUT is what one request sends: JSON like "
                             '{"text": "hi"}, or a Python expression.')
        server = model.server
        if options["http"] and server is None:
            raise UsageError("%model_bench --http sends its requests to the server %model_serve runs in this kernel, "
                             "and none is running: run %model_serve --port 0 first (it serves the live model), then "
                             "%model_bench --http again; or leave out --http to bench in-process.")
        in_kernel = not options["http"] or isinstance(server, _InKernel)
        model_input = self.shell.magics_manager.registry["RunMagics"]._parse_input(text)
        model.wait_for_background_load()
        if in_kernel and host.state is not ModelState.READY:
            raise UsageError("No model is loaded: run %model_load first, then %model_bench.")
        if options["http"]:
            engine = "" if in_kernel else " --engine ray"
            url = f"http://127.0.0.1:{server.port}/v1/models/model:predict"
            try:
                target: Any = OverHTTP(url, model_input, where=f"over HTTP (%model_serve{engine} on port "
                                       f"{server.port})", redact=host.secrets.redact)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"--http sends the input as each request's JSON body, and it is not JSON "
                                 f"({host.describe_error(exc)}). Pass JSON-compatible input, or leave out --http "
                                 "to bench in-process.") from None
        else:
            target = InProcess(host, model_input)
        levels: list = []

        def shown(level) -> None:
            levels.append(level)
            print(format_level(level), flush=True)

        print(f"Benchmarking `{host.config.model_class_name}` {target.where} at concurrency "
              f"{', '.join(map(str, options['concurrency']))}: up to {options['requests']} requests or "
              f"{options['duration']:g} s per level.", flush=True)
        try:
            # The batch sizes are the kernel's host's: a Ray replica batches in its own process.
            model.run(model.runner.run, run_bench(target, options["concurrency"], options["requests"],
                                                  options["duration"], on_level=shown,
                                                  host=host if in_kernel else None))
        except KeyboardInterrupt:
            print("Stopped: the levels above were measured in full.")
        if options["http"] and levels:
            answered = sum(lv.completed + lv.errors for lv in levels)
            print(f"{answered} requests answered over HTTP by {url} (and one warm-up before them)."
                  + ("" if in_kernel else " The Ray replicas batch in their own processes: their batch sizes are "
                                          "not seen from the kernel."))
        contract = host.contract
        tip = advice(levels, batches=contract is not None and contract.predict_batch is not None,
                     streams=contract is not None and contract.predict.is_generator,
                     bound=host.config.runtime.predict_concurrency if in_kernel else None)  # (Ray: per replica)
        if tip:
            print(tip)
        png = plot_png(levels, title=f"{host.config.model_class_name}, {target.where}")
        if png is not None:
            from IPython.display import Image, display

            display(Image(data=png, format="png"))
        elif levels:
            print("(Install matplotlib for the plot.)")
        return None

    def _usage(self) -> str:
        """The usage line magic_arguments writes into the help (``%model_bench?``), on one line."""
        usage = self.model_bench.parser.format_usage()
        return " ".join(usage[usage.index("%"):].split())

    def _parse(self, line: str) -> tuple[dict[str, Any], str]:
        """Leading options as the magic declares them (the input after them may hold any characters)."""
        declared = {a.option_strings[0][2:]: a for a in self.model_bench.parser._actions if a.option_strings}
        options: dict[str, Any] = {name: _value(name, a.default) if a.nargs != 0 else False
                                   for name, a in declared.items()}
        rest = line.strip()
        while rest.startswith("--"):
            match = _FLAG.match(rest)
            flag = match["flag"] if match else rest.split()[0][2:]
            action = declared.get(flag)
            if match is None or action is None:
                from ..core.suggest import did_you_mean

                near = did_you_mean([f"--{flag}"], [f"--{name}" for name in declared])
                raise UsageError(f"Unknown option --{flag} for %model_bench{near}. Usage: {self._usage()} "
                                 "(see %model_bench?).")
            rest = rest[match.end():]
            if action.nargs == 0:
                if rest.startswith("="):
                    raise UsageError(f"--{flag} takes no value; write --{flag} alone.")
                options[flag] = True
                rest = rest.lstrip()
                continue
            value = _VALUE.match(rest)
            if value is None:
                raise UsageError(f"--{flag} needs a value, for example --{flag} {action.metavar}; usage: "
                                 f"{self._usage()}.")
            options[flag] = _value(flag, value["value"])
            rest = rest[value.end():].lstrip()
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
