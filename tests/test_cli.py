"""The command line, run as a real subprocess (export and validate are covered in test_export)."""

import subprocess
import sys


def test_help_lists_commands_and_imports_nothing_heavy():
    out = subprocess.run([sys.executable, "-m", "kernel_magics.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "export" in out.stdout and "validate" in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from kernel_magics import cli; "
         "print(sorted(m for m in ('torch', 'fastapi', 'IPython', 'pydantic', 'yaml') if m in sys.modules))"],
        capture_output=True, text=True,
    )
    assert probe.stdout.strip() == "[]"


def test_unknown_command_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "kernel_magics.cli", "deploy"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice: 'deploy'" in out.stderr


def test_labextension_is_installed_prebuilt_and_enabled():
    from pathlib import Path

    jupyter = Path(sys.executable).parent / "jupyter"
    out = subprocess.run([str(jupyter), "labextension", "list"], capture_output=True, text=True)
    line = next((l for l in (out.stdout + out.stderr).splitlines() if "kernel-magics" in l), "")
    assert "enabled" in line and "OK" in line and "(python, kernel-magics)" in line, out.stdout + out.stderr
