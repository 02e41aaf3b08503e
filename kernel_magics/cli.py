"""The ``kernel-magics`` command line (thin: each command calls the core)."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .core.ports import port_number

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernel-magics",
        description="Turn notebook cells into a deployable Truss model. In a notebook: %load_ext kernel_magics.",
    )
    parser.add_argument("--version", action="version", version=f"kernel-magics {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    export = sub.add_parser("export", help="Export a notebook's model as a Truss directory, from the saved file "
                                           "(or, with --execute, from a fresh run of the notebook).")
    export.add_argument("notebook", type=Path, help="The .ipynb file.")
    export.add_argument("out", type=Path, help="Directory to write.")
    export.add_argument("--force", action="count", default=0,
                        help="Replace OUT when an earlier export made it (this notebook's own, unchanged since, is "
                             "replaced without it; never a folder holding the notebook); twice to replace it even "
                             "with files the export did not write (never a .git).")
    export.add_argument("--data", action="append", default=[], type=Path, metavar="PATH",
                        help="A file or folder to copy into data/ (repeatable).")
    export.add_argument("--no-replay", action="store_true",
                        help="Skip replaying the predictions saved in the notebook against the export.")
    export.add_argument("--execute", action="store_true",
                        help="Run the notebook first, headlessly, in a fresh kernel of this Python environment "
                             "(the file is not changed), and export from that kernel with every check %%model_export "
                             "makes. Without it, only what is certain to rebuild from the file, or what the "
                             "predictions saved in the notebook prove, is exported.")

    serve = sub.add_parser("serve", help="Serve a Truss directory over Truss's HTTP API (FastAPI + uvicorn).")
    serve.add_argument("dir", type=Path, help="An exported (or any) Truss directory.")
    serve.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    serve.add_argument("--port", type=port_number, default=8080,
                       help="Port to listen on (default 8080; 0 lets the system pick a free one, said in the log).")
    serve.add_argument("--secrets-dir", type=Path, default=None,
                       help="A folder with one file per secret, named after it (as Truss mounts /secrets).")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                       help="Least severe log lines to show (default info: one line per handled request).")
    serve.add_argument("--log-format", choices=["text", "json"], default="text",
                       help="text for a terminal (default), or json: one JSON object a line, as Truss's server logs "
                            "(the uvicorn engine; with --engine ray, Ray logs as it does).")
    serve.add_argument("--max-body-size", type=int, default=100 * 2**20, metavar="BYTES",
                       help="The largest request body accepted (default 104857600, 100 MiB); larger ones get 413.")
    serve.add_argument("--no-metrics", action="store_true",
                       help="Keep no request counts or latencies (/metrics then shows only what the model registers).")
    serve.add_argument("--secrets-from-stdin", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--engine", choices=["uvicorn", "ray"], default="uvicorn",
                       help="uvicorn: one process (default). ray: Ray Serve replicas, on this machine or a cluster.")
    serve.add_argument("--replicas", type=int, default=1, help="With --engine ray: how many replicas.")
    serve.add_argument("--replicas-per-node", type=int, default=None, metavar="N",
                       help="With --engine ray: at most N replicas on one node (1 spreads them over the nodes).")
    serve.add_argument("--min-replicas", type=int, default=None,
                       help="With --engine ray: autoscale, from this many replicas ...")
    serve.add_argument("--max-replicas", type=int, default=None, help="... up to this many.")
    serve.add_argument("--target-ongoing-requests", type=float, default=2.0, metavar="N",
                       help="With autoscaling: the ongoing requests per replica Serve aims for (default 2).")
    serve.add_argument("--deploy-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="With --engine ray: how long to wait for the replicas to start and load the model "
                            "(default 300).")
    serve.add_argument("--address", default=None,
                       help="With --engine ray: join this Ray cluster (ray start --head elsewhere) instead of "
                            "starting a local Ray.")

    validate = sub.add_parser("validate", help="Check a Truss directory: config, model class, requirements, import.")
    validate.add_argument("dir", type=Path)
    validate.add_argument("--no-import", action="store_true",
                          help="Skip importing model.py in a fresh Python (for a model whose packages are not "
                               "installed here, a GPU host's torch say); the static checks still run.")
    validate.add_argument("--secrets-dir", type=Path, default=None,
                          help="A folder with one file per secret, named after it (as Truss mounts /secrets), for "
                               "the load the check runs; TRUSS_SECRET_<name> variables work too.")
    predict = sub.add_parser(
        "predict", help="Load a Truss directory and print its answer to one input, as `truss predict` does.",
        description="Load the model once, in this process (as the server would), run one prediction and print "
                    "it: a result as one JSON line, a stream chunk by chunk as it comes. What the model prints "
                    "goes to stderr, so stdout holds only the answer.",
        epilog=_examples("kernel-magics predict ./tiny-chargen -d '{\"prompt\": \"To be\"}'",
                         "kernel-magics predict ./tiny-chargen -f input.json | jq .",
                         "echo '{\"prompt\": \"hi\"}' | kernel-magics predict ./tiny-chargen -f -"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("dir", type=Path, help="An exported (or any) Truss directory.")
    given = predict.add_mutually_exclusive_group(required=True)
    given.add_argument("-d", "--data", metavar="JSON", help="The model input, as JSON.")
    given.add_argument("-f", "--file", type=Path, metavar="PATH", help="A file holding the JSON input (- for stdin).")
    predict.add_argument("--secrets-dir", type=Path, default=None,
                         help="A folder with one file per secret, named after it (as Truss mounts /secrets); "
                              "TRUSS_SECRET_<name> variables work too.")

    completion = sub.add_parser("completion", help="Print a shell completion script.",
                                epilog=_examples('eval "$(kernel-magics completion bash)"     # in ~/.bashrc',
                                                 "autoload -U bashcompinit && bashcompinit && "
                                                 'eval "$(kernel-magics completion bash)"   # zsh'),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    completion.add_argument("shell", choices=["bash"], help="The shell (bash; zsh through bashcompinit).")

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _examples(
        "kernel-magics export notebooks/quickstart.ipynb ./tiny-chargen",
        "kernel-magics validate ./tiny-chargen",
        "kernel-magics predict ./tiny-chargen -d '{\"prompt\": \"To be\"}'",
        "kernel-magics serve ./tiny-chargen --port 8080",
        "kernel-magics <command> --help          # every option of a command",
    ) + "\n\n" + EXIT_CODES
    for name, lines in _COMMAND_EXAMPLES.items():
        command = sub.choices[name]
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        command.epilog = _examples(*lines)
    return parser


EXIT_CODES = """exit codes:
  0    done
  1    the command failed; the message on stderr says why and what to change
  2    a usage error: an unknown command or option, a bad value, input that is not JSON
  3    serve could not listen: the port is in use (or the address is not this machine's)
  130  interrupted (Ctrl-C)
  143  (in a shell) serve on uvicorn stopped by SIGTERM: it shuts down, then ends by that signal;
       serve --engine ray takes its deployment down on SIGTERM or Ctrl-C and exits 0"""

_COMMAND_EXAMPLES = {
    "export": ["kernel-magics export notebooks/quickstart.ipynb ./tiny-chargen",
               "kernel-magics export model.ipynb ./out --force --data weights/",
               "kernel-magics export model.ipynb ./out --execute     # run the notebook first, then export"],
    "serve": ["kernel-magics serve ./tiny-chargen --port 8080",
              "curl -X POST localhost:8080/v1/models/model:predict -d '{\"prompt\": \"To be\"}'",
              "kernel-magics serve ./tiny-chargen --engine ray --replicas 2"],
    "validate": ["kernel-magics validate ./tiny-chargen",
                 "kernel-magics validate ./gpu-model --no-import     # its packages are not installed here"],
}


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _export(args: argparse.Namespace) -> int:
    from .core.errors import in_words
    from .core.export import ExportError, MismatchHint, export_model, materialize
    from .core.notebook_file import config_from_cells, read_notebook
    from .core.source import changed_after_load, trained_at_import

    notebook = read_notebook(args.notebook)
    if notebook.note:
        print(f"note: {notebook.note}", file=sys.stderr)
    config = config_from_cells(notebook.cells, source=str(args.notebook))
    if args.execute:
        return _export_by_running(args)
    base = args.notebook.resolve().parent
    # The notebook's own predictions are the results it saved: the export must answer them too.
    record = notebook.recorded_predictions()
    if notebook.unread_again:
        print("note: a `%model_predict --again` cell printed an answer too long to read back from the file, so the "
              "predictions saved before it are not replayed; predict those inputs again in cells of their own (or "
              "export with --execute).", file=sys.stderr)
    materialized = materialize(notebook.cells, config, base, args.notebook.name, record=record,
                               replay=not args.no_replay, unsure_cells=notebook.unsure_cells)
    unproven = materialized.source.unproven
    # The CLI reads the cells top to bottom, each once: a cell whose statements model.py holds that ran after one
    # below it, or one whose changes give another value each run that may have run twice, is not what it reads.
    source = materialized.source
    unsure = [cell for cell in notebook.unsure_cells if cell in source.held_cells]
    if unsure:
        raise ExportError(
            f"Code cell {unsure[0] + 1} holds what model.py needs, but the saved notebook shows it did not run (no "
            "In [N]) or stopped at an error, so the notebook may not have what the file shows there. Run it (fix the "
            "error, or delete the cell), save the notebook and export again, or export with --execute.")
    stale = changed_after_load(notebook.cells, config.model_class_name)
    if stale is not None:
        # (the kernel's %model_export refuses this too: the loaded model answered from what load() read then)
        load_cell, changes = stale
        said = in_words([f"`{name}` (`{c.text}` in cell {c.cell + 1}, line {c.line})" for name, c in changes])
        raise ExportError(
            f"{said} changed after %model_load ran (cell {load_cell + 1}), and load() reads "
            f"{'it' if len(changes) == 1 else 'them'}: the notebook's loaded model answered from what its load() read "
            "then, while the export's load() reads the value as the cells leave it, so the two would answer "
            "differently. Run %model_load again after that cell (then `%model_predict --again`), save the notebook "
            "and export again, or export with --execute.")
    ran = notebook.ran_late(source.held_cells) or notebook.maybe_ran_twice(source.unrepeatable_cells)
    if ran:
        raise ExportError(
            f"The saved notebook's In [N] numbers show that {ran}, and model.py holds what that cell does; "
            "`kernel-magics export` reads the cells top to bottom, each once, so its model may not be the notebook's. "
            "Run the notebook from the top (Restart & Run All) and save it, or export with --execute (it runs the "
            "notebook in a fresh kernel).")

    def explain(index: int) -> Optional[MismatchHint]:
        if notebook.out_of_order:
            return MismatchHint(
                f"the notebook's cells ran in another order than the file lists them ({notebook.out_of_order}), and "
                "`kernel-magics export` reads them top to bottom",
                "Run the notebook from the top (Restart & Run All) and save it, or export with --execute")
        at = notebook.prediction_cell(record, index)
        firsts = {name: next((c for c in changes if at is not None and c.cell > at and c.order in source.carried),
                             None)
                  for name, changes in source.changes.items()}
        later = sorted((c.cell, c.line, f"`{name}` (`{c.text}` in cell {c.cell + 1}, line {c.line})")
                       for name, c in firsts.items() if c is not None)
        if later:
            causes = [text for _, _, text in later]
            return MismatchHint(
                f"{in_words(causes)} changed after this prediction was saved (cell {at + 1}); model.py carries "
                f"{'that change' if len(causes) == 1 else 'those changes'}",
                "Predict that input again after the change (or run the notebook from the top: Restart & Run All) "
                "and save the notebook")
        if not unproven:
            return None
        return MismatchHint(
            f"{', '.join(f'`{n}`' for n in unproven)} {'is' if len(unproven) == 1 else 'are'} re-run from the "
            "notebook's source, which the file alone cannot prove gives the value the notebook had",
            "Run `kernel-magics export` with --execute to export from a kernel that ran the notebook")

    result = export_model(args.out, materialized, base_dir=base, data=args.data, force=args.force,
                          protected=[args.notebook.resolve()], replay=not args.no_replay, explain_mismatch=explain,
                          origin=str(args.notebook.resolve()))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.replaced:
        print(f"note: this export replaced the earlier one in {args.out}.", file=sys.stderr)
    print(f"Exported `{config.model_class_name}` from {args.notebook.name} as a Truss:")  # (as %model_export says)
    print(result.tree())
    print(result.replay_note.replace("%model_predict", "%model_predict (and save the notebook)"))
    trains = trained_at_import(materialized.source.text)
    if trains:
        # (a new user found a RandomForest fitted at every start only by reading model.py)
        print(f"note: model.py trains when it is imported, each time the deployment starts: "
              f"{'; '.join(f'`{t}`' for t in trains[:3])}. `kernel-magics export --execute`, or %model_export in the "
              "running notebook, saves the fitted value instead.", file=sys.stderr)
    return 0


def _export_by_running(args: argparse.Namespace) -> int:
    if _missing_extra(("nbclient",), "execute", "kernel-magics export --execute"):
        return 1
    from .core.headless import export_by_running

    # nbformat imports jsonschema, which builds an IRI grammar at import when rfc3987_syntax is installed (JupyterLab
    # brings it): 1.7 s of this command's 3 to 6 s here, for a format no notebook schema uses. This process is ours
    # (the kernel, where the user's code runs, is another), so jsonschema goes without it, as it does where it is
    # not installed.
    sys.modules.setdefault("rfc3987_syntax", None)
    printed = export_by_running(args.notebook, args.out, force=args.force, data=args.data,
                                replay=not args.no_replay, progress=lambda line: print(line, flush=True))
    # (the kernel's line names no notebook; this command's names the one it ran, as the export from the file does)
    printed = re.sub(r"^(Exported `[^`]+`) as a Truss", lambda m: f"{m[1]} from {args.notebook.name} as a Truss",
                     printed, count=1, flags=re.M)
    print(printed, end="" if printed.endswith("\n") else "\n")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .core.config import requirement_warnings
    from .core.truss_dir import TrussDir, validate

    truss = TrussDir.open(args.dir)
    for warning in truss.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for warning in requirement_warnings(truss.config.requirements):  # (the check runs the model with what is here)
        print(warning, file=sys.stderr)
    print(validate(truss, import_check=not args.no_import, secrets_dir=args.secrets_dir).summary())
    return 0


def _missing_extra(modules: tuple[str, ...], extra: str, what: str, args: Optional[argparse.Namespace] = None) -> bool:
    """Say in one line which extra to install when a command needs one that is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        _say(args, f"error: {what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                   f"installed. Install it with `pip install 'kernel-magics[{extra}]'`.")
    return bool(missing)


def _serve(args: argparse.Namespace) -> int:
    if _missing_extra(("fastapi", "uvicorn"), "serve", "kernel-magics serve", args):
        return 1
    ray_only = (args.replicas != 1 or args.address or args.replicas_per_node or args.min_replicas is not None
                or args.max_replicas is not None)
    from .serving.background import exit_with_parent

    exit_with_parent()
    if args.engine == "ray":
        from .serving.ray_engine import Scale, serve_with_ray

        counts = [args.replicas, args.replicas_per_node or 1, args.min_replicas or 1, args.max_replicas or 1]
        if min(counts) < 1:
            _say(args, "error: replica counts must be at least 1.")
            return 2
        if args.min_replicas and args.max_replicas and args.min_replicas > args.max_replicas:
            _say(args, "error: --min-replicas is more than --max-replicas.")
            return 2
        scale = Scale(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                      target_ongoing_requests=args.target_ongoing_requests, per_node=args.replicas_per_node)
        truss = _open_for_serving(args.dir, args=args)
        serve_with_ray(truss, host=args.host, port=args.port, address=args.address, secrets_dir=args.secrets_dir,
                       secrets=_secrets_from_stdin(args), scale=scale, deploy_timeout=args.deploy_timeout,
                       max_body=args.max_body_size)
        return 0
    if ray_only:
        _say(args, "error: --replicas, --replicas-per-node, --min-replicas, --max-replicas and --address need "
                   "--engine ray.")
        return 2
    from .core.errors import PortUnavailable
    from .serving.stand_in import stand_in

    # Liveness answers from here on, while FastAPI, uvicorn and our server are imported (about a second on
    # this 2-core machine): a stand-in holds the port, then hands the socket itself to uvicorn.
    with contextlib.ExitStack() as stack:
        try:
            holding = stack.enter_context(stand_in(args.host, args.port, share_port=False))
        except PortUnavailable:
            _open_for_serving(args.dir, args=args, warn=False)  # a directory that cannot be served is the first thing to fix
            raise
        from .core.config import requirement_warnings
        from .serving.uvicorn_engine import serve_truss

        truss = _open_for_serving(args.dir, args=args)  # what needs no import fails at once; model.py is imported in the load thread
        for warning in requirement_warnings(truss.config.requirements):
            _say(args, warning, level="WARNING")
        serve_truss(truss, host=args.host, port=args.port, secrets_dir=args.secrets_dir,
                    secrets=_secrets_from_stdin(args), log_level=args.log_level, log_format=args.log_format,
                    max_body=args.max_body_size, metrics=not args.no_metrics, stand_in=holding)
    return 0


def _open_for_serving(path: Path, args: argparse.Namespace, warn: bool = True):
    from .core.truss_dir import TrussDir

    truss = TrussDir.open(path)
    truss.check_static()
    for warning in truss.warnings if warn else ():
        _say(args, f"warning: {warning}", level="WARNING")
    return truss


def _secrets_from_stdin(args: argparse.Namespace) -> Optional[dict]:
    """Secret values a parent process (%model_serve) wrote to our stdin: never in an environment."""
    if not args.secrets_from_stdin:
        return None
    import json

    return json.loads(sys.stdin.readline() or "{}")


def _read_input(args: argparse.Namespace) -> object:
    import json

    if args.data is not None:
        text, where = args.data, "-d"
    else:
        try:
            text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
        except OSError as exc:
            raise _UsageError(f"cannot read {args.file}: {exc.strerror}.") from None
        where = f"-f {args.file}"
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _UsageError(f"the input given with {where} is not JSON ({exc}). Quote it for the shell, for "
                          "example -d '{\"prompt\": \"hi\"}'.") from None


def _predict(args: argparse.Namespace) -> int:
    model_input = _read_input(args)
    import contextlib

    from .core.oneshot import ModelFailed, predict_once

    out = sys.stdout.buffer
    wrote = []

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()
        wrote.append(data[-1:])

    try:
        with contextlib.redirect_stdout(sys.stderr):  # what the model prints: stdout holds only the answer
            predict_once(args.dir, model_input, write=write, secrets_dir=args.secrets_dir)
    except ModelFailed as exc:
        sys.stderr.write(exc.traceback_text)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if wrote and wrote[-1] != b"\n" and sys.stdout.isatty():
        out.write(b"\n")  # the prompt on its own line; a pipe gets the stream's bytes unchanged
    return 0


def _completion(args: argparse.Namespace) -> int:
    """A bash completion script made from the parser itself, so it never lists a stale option."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    cases = []
    for name, command in commands.items():
        options = sorted(o for a in command._actions if a.help != argparse.SUPPRESS for o in a.option_strings)
        choices = {o: " ".join(map(str, a.choices)) for a in command._actions if a.choices
                   for o in a.option_strings}
        values = "".join(f'        {o}) COMPREPLY=($(compgen -W "{c}" -- "$cur")); return;;\n'
                         for o, c in choices.items())
        positional = next((a for a in command._actions if not a.option_strings and a.choices), None)
        fallback = (f'COMPREPLY=($(compgen -W "{" ".join(positional.choices)}" -- "$cur"))' if positional
                    else 'COMPREPLY=($(compgen -f -- "$cur"))')
        cases.append(f"    {name})\n      case \"$prev\" in\n{values}      esac\n"
                     f"      if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W \"{' '.join(options)}\" -- \"$cur\"))\n"
                     f"      else {fallback}; fi;;")
    print(f"""# bash completion for kernel-magics (kernel-magics completion bash)
_kernel_magics() {{
  local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} command=""
  local i
  for ((i = 1; i < COMP_CWORD; i++)); do
    case ${{COMP_WORDS[i]}} in -*) ;; *) command=${{COMP_WORDS[i]}}; break;; esac
  done
  case $command in
    "") COMPREPLY=($(compgen -W "{' '.join(commands)} --help --version" -- "$cur"));;
{chr(10).join(cases)}
  esac
}}
complete -o filenames -F _kernel_magics kernel-magics
""")
    return 0


class _UsageError(Exception):
    """Bad input on the command line: exit code 2, as argparse's own errors."""


def _refuse_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> None:
    """What argparse says of arguments it does not know, but from the command they were given to (its usage, not
    the top level's), with the option meant when one is a near miss (`serve --prot`: did you mean --port?)."""
    from .core.suggest import did_you_mean

    command = _commands(parser).get(args.command, parser)
    known = [o for o, action in command._option_string_actions.items() if action.help != argparse.SUPPRESS]
    typed = [word.split("=")[0] for word in unknown if word.startswith("-")]
    misplaced = [word for word in typed if word in known]  # before the command's name, or after `--`
    hint = (f" ({' and '.join(misplaced)} must come after `{args.command}`, before any --)" if misplaced else
            did_you_mean(typed, known))
    command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def _commands(parser: argparse.ArgumentParser) -> dict:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(parser, args, unknown)
    if args.command is None:
        parser.print_help()
        return 0
    from .core.errors import KernelMagicsError, PortUnavailable

    try:
        secrets_dir = getattr(args, "secrets_dir", None)
        if secrets_dir is not None and not secrets_dir.is_dir():  # (else every secret would be "not set" there)
            raise _UsageError(f"--secrets-dir {secrets_dir} is not a folder. Give the folder that holds one file per "
                              "secret, named after it.")
        return {"export": _export, "validate": _validate, "serve": _serve, "predict": _predict,
                "completion": _completion}[args.command](args)
    except _UsageError as exc:
        _say(args, f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say(args, "interrupted", level="WARNING")
        _quit_at_once_if_model_code_still_runs(args)
        return 130
    except PortUnavailable as exc:  # "3 serve could not listen" (EXIT_CODES)
        _say(args, f"error: {exc}")
        return 3
    except KernelMagicsError as exc:
        _say(args, f"error: {exc}")
        return 1
    except OSError as exc:  # a file system refusal the checks before did not foresee: one line, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        _say(args, f"error: {exc.strerror or exc}{where}. Check the path and its permissions.")
        return 1


def _quit_at_once_if_model_code_still_runs(args: argparse.Namespace) -> None:
    """Python cannot stop a thread: a predict or a chunk still inside model code after a forced quit keeps the process
    until it returns (the interpreter's exit waits for the worker threads, as it does for Truss's server's). Say so,
    and let one more Ctrl-C or SIGTERM end the process at once, instead of the traceback Python prints when that
    wait is interrupted."""
    import os
    import signal
    import threading

    runtime = sys.modules.get("kernel_magics.core.runtime")  # (not imported: no model code ran here)
    busy = runtime.calls_in_model_code() if runtime is not None else 0
    if not busy or threading.current_thread() is not threading.main_thread():
        return

    def quit_now(number: int, frame: object) -> None:
        os._exit(128 + number)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, quit_now)
    _say(args, f"model code is still running in {busy} thread{'s' if busy > 1 else ''}, and the process ends when it "
               "returns (Python cannot stop a thread). Press Ctrl-C again to quit at once.", level="WARNING")


def _say(args: Optional[argparse.Namespace], text: str, level: str = "ERROR") -> None:
    """A line of the command's own on stderr (an error, a warning, "interrupted"); with ``serve --log-format json`` on
    the uvicorn engine, a JSON line like the server's, so a log collector that reads every line as JSON reads these
    too. (Ray's engine logs as Ray does: there the flag changes nothing.)"""
    if getattr(args, "log_format", "text") != "json" or getattr(args, "engine", "uvicorn") != "uvicorn":
        print(text, file=sys.stderr)
        return
    import logging

    from .serving.logs import JsonLines

    for prefix in ("error: ", "warning: "):  # (the JSON line's level says it)
        text = text[len(prefix):] if text.startswith(prefix) else text
    record = logging.LogRecord("kernel_magics.cli", getattr(logging, level), __file__, 0, text, None, None)
    sys.stderr.write(JsonLines().format(record) + "\n")  # one write: a log line from another thread cannot split it


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
