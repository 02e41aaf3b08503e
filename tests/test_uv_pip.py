"""The set-up's uv install reads pip's configuration as pip does (.ci/uv_pip.py): a machine's private indexes,
wheel folders, constraints and trusted hosts reach uv, in pip's order of precedence."""

import os

from uv_install import pip_settings_for_uv


def test_pip_conf_reaches_uv_as_pip_reads_it(tmp_path, monkeypatch):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nextra-index-url =\n    https://a.example/simple\n    https://b.example/simple\n"
                    "trusted-host = a.example\ntimeout = 30\n"
                    "[install]\nno-index = true\nfind-links = /srv/wheels\n"
                    "[freeze]\ntimeout = 5\n")
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "none"))  # no machine-wide pip.conf
    monkeypatch.setenv("HOME", str(tmp_path))
    options, variables = pip_settings_for_uv()
    assert ["--extra-index-url", "https://a.example/simple", "--extra-index-url", "https://b.example/simple"] == \
        options[:4], options  # a multi-line value is one source per line
    assert "--no-index" in options and options[options.index("--find-links") + 1] == "/srv/wheels"
    assert options[options.index("--allow-insecure-host") + 1] == "a.example"
    assert variables["UV_HTTP_TIMEOUT"] == "30"  # [global]'s; [freeze] is another command's section
    # A PIP_* variable wins over the files, as for pip.
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "99")
    assert pip_settings_for_uv()[1]["UV_HTTP_TIMEOUT"] == "99"
