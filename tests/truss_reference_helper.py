"""Runs in the Truss reference venv and answers, one JSON line per request on stdin, with truss 0.18.36's own code
from ../shared/truss_reference: ``{"op": "prepare", "dir": D, "work": W}`` builds W/fs for Truss's server
(_prepare_fs.main, what serve_with_truss.sh runs first) and ``{"op": "validate", "dir": D}`` validates D
(validate.main). One process for a test process's whole run: importing truss is about 1.2 s of CPU, a prepare
0.1 s and a validation 2 ms, and the suite prepares and validates about 70 directories. Neither imports the
model, so nothing of one directory stays for the next. Answers ``{"dir": D, "code": N, "output": "..."}``
(tests/server_harness.truss_reference asks).
"""

import contextlib
import io
import json
import os
import sys
import traceback

# The answers go out on a copy of stdout; stdout itself becomes stderr, so that nothing else written to it (a C
# library, a child process) can fall between two answers.
answers = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

sys.path.insert(0, sys.argv[1])  # ../shared/truss_reference
import _prepare_fs  # noqa: E402
import validate  # noqa: E402

for line in sys.stdin:
    request, out = json.loads(line), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if request["op"] == "prepare":
                _prepare_fs.main(request["dir"], request["work"])
                code = 0
            else:
                code = validate.main([request["dir"], *request.get("flags", [])])
    except BaseException:  # noqa: BLE001 (a SystemExit too): the answer says what failed
        out.write(traceback.format_exc())
        code = 1
    answers.write(json.dumps({"dir": request["dir"], "code": code, "output": out.getvalue()}) + "\n")
    answers.flush()
