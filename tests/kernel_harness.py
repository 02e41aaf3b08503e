"""A real Jupyter kernel driven over jupyter_client, for tests and benchmarks."""

from __future__ import annotations

import os
import queue
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from jupyter_client.manager import KernelManager


@dataclass
class Execution:
    """Everything one execute request produced."""

    status: str
    outputs: list = field(default_factory=list)
    reply: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)  # every iopub message, for counting

    @property
    def stdout(self) -> str:
        return "".join(o["text"] for o in self.outputs if o["type"] == "stream" and o["name"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(o["text"] for o in self.outputs if o["type"] == "stream" and o["name"] == "stderr")

    @property
    def displayed(self) -> str:
        """The text/plain of every display output, as it stands at the end (updates applied)."""
        return "".join(o["data"].get("text/plain", "") for o in self.outputs if o["type"] == "display_data")

    @property
    def result(self) -> Optional[str]:
        for o in self.outputs:
            if o["type"] == "execute_result":
                return o["data"].get("text/plain")
        return None

    @property
    def error(self) -> Optional[dict]:
        for o in self.outputs:
            if o["type"] == "error":
                return o
        return None

    @property
    def error_text(self) -> str:
        err = self.error
        if not err:
            return ""
        import re
        return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(err["traceback"]))

    @property
    def all_text(self) -> str:
        """Every piece of text any output carried (for leak checks)."""
        parts = []
        for o in self.outputs:
            if o["type"] == "stream":
                parts.append(o["text"])
            elif o["type"] in ("execute_result", "display_data"):
                parts.extend(str(v) for v in o["data"].values())
            elif o["type"] == "error":
                parts.append(o["ename"] + o["evalue"] + "\n".join(o["traceback"]))
        return "\n".join(parts)


class _KernelManager(KernelManager):
    debugger = True

    def format_kernel_cmd(self, extra_arguments=None) -> list:
        """Without the debugger: ipykernel_launcher's command with kernel-magics's own launcher (0.7 s of CPU less
        in each kernel's start: kernel_magics/notebook/kernel_launcher.py)."""
        cmd = super().format_kernel_cmd(extra_arguments)
        if not self.debugger and cmd[1:3] == ["-m", "ipykernel_launcher"]:
            cmd[2] = "kernel_magics.notebook.kernel_launcher"
        return cmd


class Kernel:
    """A running IPython kernel (this interpreter's), with kernel_magics importable."""

    running: list["Kernel"] = []  # every kernel not shut down yet (tests/conftest.py stops a test's leftovers)
    spare_checkers = True  # what a kernel started without spare_checker= has (tests/conftest.py: off in the tests)
    debugger = True  # whether its kernels start ipykernel's debugger, as users' do (tests/conftest.py: off)

    def __init__(self, env: Optional[dict] = None, cwd: Optional[str] = None,
                 spare_checker: Optional[bool] = None, debugger: Optional[bool] = None) -> None:
        """``spare_checker=False``: the kernel starts no spare checker (``ModelMagics.spare_checker``);
        ``debugger=False``: nor ipykernel's debugger."""
        if spare_checker is None:
            spare_checker = Kernel.spare_checkers
        # Unix sockets in the temp dir, not TCP ports: jupyter_client picks free ports by binding and closing them,
        # and another test's server or kernel could take one before this kernel binds it (a kernel that then never
        # answers, seen once in a whole run). An absolute path: the kernel's working directory is not this one's.
        # The socket files go when the kernel is shut down.
        ipc = os.path.join(tempfile.gettempdir(), f"kmk-{uuid.uuid4().hex[:12]}")
        self.km = _KernelManager(kernel_name="python3", transport="ipc", ip=ipc)
        self.km.debugger = Kernel.debugger if debugger is None else debugger
        Kernel.running.append(self)
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
        options = ["--HistoryManager.enabled=False", *([] if spare_checker else ["--ModelMagics.spare_checker=False"])]
        self.km.start_kernel(env=full_env, cwd=cwd or os.getcwd(), extra_arguments=options)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def execute(self, code: str, timeout: float = 120, stdin: Optional[Callable[[dict], str]] = None,
                on_message: Optional[Callable[[dict], None]] = None, store_history: bool = True) -> Execution:
        """``store_history=False``: as a frontend's own commands run (no In[N]), JupyterLab's extension's say."""
        msg_id = self.kc.execute(code, allow_stdin=stdin is not None, store_history=store_history)
        ex = Execution(status="?")
        deadline = time.monotonic() + timeout
        idle = False
        while not idle:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cell did not finish in {timeout}s: {code[:80]!r}")
            if stdin is not None:
                try:
                    req = self.kc.stdin_channel.get_msg(timeout=0.01)
                    self.kc.input(stdin(req["content"]))
                except queue.Empty:
                    pass
            try:
                msg = self.kc.iopub_channel.get_msg(timeout=0.05)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            ex.messages.append(msg)
            if on_message:
                on_message(msg)
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                idle = True
            elif kind == "stream":
                ex.outputs.append({"type": "stream", "name": content["name"], "text": content["text"]})
            elif kind in ("execute_result", "display_data"):
                display_id = content.get("transient", {}).get("display_id")
                ex.outputs.append({"type": kind, "data": content["data"], "display_id": display_id})
            elif kind == "update_display_data":  # as a notebook does: the output with that id changes in place
                display_id = content.get("transient", {}).get("display_id")
                for output in ex.outputs:
                    if output.get("display_id") == display_id:
                        output["data"] = content["data"]
            elif kind == "error":
                ex.outputs.append({"type": "error", **content})
        reply = self.kc.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:  # start_channels' kernel_info reply, say
            reply = self.kc.get_shell_msg(timeout=timeout)
        ex.reply = reply["content"]
        ex.status = ex.reply["status"]
        return ex

    def ok(self, code: str, **kw: Any) -> Execution:
        """Execute and fail loudly if the cell errored."""
        ex = self.execute(code, **kw)
        assert ex.status == "ok", f"cell failed:\n{code}\n{ex.error_text}\n{ex.stderr}"
        return ex

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def shutdown(self) -> None:
        """Stop the kernel (again is fine: a test may end one early that a fixture also stops)."""
        if self in Kernel.running:
            Kernel.running.remove(self)
        if not self.km.has_kernel:
            return
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
