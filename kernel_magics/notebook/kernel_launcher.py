"""``python -m kernel_magics.notebook.kernel_launcher -f CONNECTION_FILE``: an IPython kernel without ipykernel's
debugger, for the kernels kernel-magics starts for itself (``kernel-magics export --execute``) and the tests start.

ipykernel starts its debugger whenever debugpy can be imported, and importing debugpy is most of a kernel's start:
0.7 s of its 1.1 s of CPU on a 2-core machine. Nobody attaches a debugger to these kernels. ipykernel decides once,
when its ``debugger`` module is first imported: debugpy is hidden for that import only, so startup files,
extensions and the notebook's own code may import it. Otherwise this is ipykernel_launcher (its path in
``sys.argv[0]`` too, where some libraries look to tell a Jupyter kernel).
"""

import importlib.util
import sys
from pathlib import Path


def main() -> None:
    # As ipykernel_launcher: the working directory is off the path while the kernel imports (IPython puts it back).
    if sys.path and (sys.path[0] == "" or Path(sys.path[0]) == Path.cwd()):
        del sys.path[0]
    launcher = importlib.util.find_spec("ipykernel_launcher")
    if launcher is not None and launcher.origin:
        sys.argv[0] = launcher.origin
    sys.modules["debugpy"] = None  # ipykernel's debugger finds no debugpy, as where it is not installed
    try:
        import ipykernel.debugger  # noqa: F401  (it decides here, once)
    finally:
        if sys.modules.get("debugpy", 0) is None:
            del sys.modules["debugpy"]
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance()


if __name__ == "__main__":
    main()
