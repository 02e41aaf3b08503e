"""The command line, run as a real subprocess."""

import subprocess
import sys


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kernel_magics.cli", *args], capture_output=True, text=True, **kw)


def test_help_lists_commands_and_imports_nothing_heavy():
    out = run("--help")
    assert out.returncode == 0 and "check-config" in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from kernel_magics import cli; "
         "print(sorted(m for m in ('torch', 'fastapi', 'IPython', 'pydantic', 'yaml') if m in sys.modules))"],
        capture_output=True, text=True,
    )
    assert probe.stdout.strip() == "[]"


def test_check_config(tmp_path):
    good = tmp_path / "config.yaml"
    good.write_text("model_name: m\nresources: {accelerator: T4}\n")
    out = run("check-config", str(good))
    assert out.returncode == 0 and "OK" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name: m\nresorces: {}\n")
    out = run("check-config", str(bad))
    assert out.returncode == 1 and "line 2: unknown key `resorces`. Did you mean `resources`?" in out.stderr
    assert "Traceback" not in out.stderr
    out = run("check-config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "cannot read" in out.stderr
