"""``python -m kernel_magics.notebook.kernel_launcher -f CONNECTION_FILE``: an IPython kernel without ipykernel's
debugger, for the kernels kernel-magics starts for itself (``kernel-magics export --execute``) and the tests start.

ipykernel starts its debugger whenever debugpy can be imported, and importing debugpy is most of a kernel's start:
0.7 s of its 1.1 s of CPU on a 2-core machine. Nobody attaches a debugger to these kernels. debugpy is hidden only
while ipykernel decides; the notebook's own code may import it afterwards. Otherwise this is ipykernel_launcher.
"""

import sys
from pathlib import Path


def main() -> None:
    # As ipykernel_launcher: the working directory is off the path while the kernel imports (IPython puts it back).
    if sys.path and (sys.path[0] == "" or Path(sys.path[0]) == Path.cwd()):
        del sys.path[0]
    sys.modules["debugpy"] = None  # ipykernel's debugger finds no debugpy, as where it is not installed
    try:
        from ipykernel.kernelapp import IPKernelApp

        app = IPKernelApp.instance()
        app.initialize()  # (the kernel decides here, once, whether it has a debugger)
    finally:
        if sys.modules.get("debugpy", 0) is None:
            del sys.modules["debugpy"]
    app.start()


if __name__ == "__main__":
    main()
