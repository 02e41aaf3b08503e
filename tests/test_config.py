"""config.yaml parsing: Truss field names, line numbers, did-you-mean, no secret values."""

import pytest
import yaml

from kernel_magics.core.config import ModelConfig, parse_config
from kernel_magics.core.errors import ConfigError


def error_of(text: str, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, **kw)
    return str(info.value)


def test_defaults_without_config():
    config = parse_config("")
    assert config.model_class_name == "Model"
    assert config.runtime.predict_concurrency == 1
    assert config.data_dir == "data"
    assert config.resources.use_gpu is False


def test_truss_fields_parse_and_use_gpu_is_derived():
    config = parse_config(
        "model_name: m\nmodel_class_name: Net\npython_version: py311\nrequirements: [torch==2.13.0]\n"
        "resources: {accelerator: 'A10G:2', cpu: 2, memory: 4Gi}\nsecrets: {hf_access_token: null}\n"
        "environment_variables: {FLAG: true, N: 3}\nmodel_metadata: {a: 1}\ndata_dir: assets\n"
        "external_package_dirs: [../pkgs]\nruntime: {predict_concurrency: 4}\n"
    )
    assert config.model_class_name == "Net"
    assert config.resources.use_gpu is True and config.resources.cpu == "2"
    assert config.environment_variables == {"FLAG": "true", "N": "3"}
    assert config.secret_names == ["hf_access_token"]
    assert config.runtime.predict_concurrency == 4
    data = config.to_dict()
    assert data["resources"]["use_gpu"] is True and data["secrets"] == {"hf_access_token": None}


def test_truss_only_keys_pass_through_unchanged():
    config = parse_config("model_name: m\nsystem_packages: [ffmpeg]\nbuild_commands: [echo hi]\n")
    assert config.to_dict()["system_packages"] == ["ffmpeg"]


def test_yaml_syntax_error_names_line_and_column():
    msg = error_of("model_name: m\nrequirements: [torch\n", source="cell", line_offset=1)
    assert msg.startswith("cell, line 4, column 1: YAML syntax error")


def test_unknown_key_suggests_closest():
    assert "line 2: unknown key `modle_name`. Did you mean `model_name`?" in error_of("model_name: y\nmodle_name: x\n")


def test_every_unknown_key_is_named_at_once_with_its_line():
    """A new user's cell with `model_nme` and `resouces` showed the first, then, once fixed, the second."""
    message = error_of("model_nme: x\nresouces:\n  cpu: '1'\nruntime:\n  predict_concurency: 2\n")
    assert message == ("config.yaml: 3 unknown keys: line 1: `model_nme` (did you mean `model_name`?); line 2: "
                       "`resouces` (did you mean `resources`?); line 5: `runtime.predict_concurency` (did you mean "
                       "`runtime.predict_concurrency`?). Fix those keys."), message
    # A section's valid keys are listed once; `gpu` is not offered `cpu`.
    message = error_of("resources:\n  gpu: 1\n  zzz: 1\n  qqq: 2\n")
    assert ("line 2: `resources.gpu` (did you mean `resources.accelerator`?); line 3: `resources.zzz` (valid keys here: "
            in message and "line 4: `resources.qqq` (not a key there)" in message), message


def test_unknown_nested_key_suggests_closest():
    msg = error_of("resources:\n  acclerator: T4\n")
    assert "line 2: unknown key `resources.acclerator`. Did you mean `resources.accelerator`?" in msg


def test_wrong_type_names_the_field():
    assert "`requirements` must be a list, not str" in error_of("requirements: torch\n")
    assert "`runtime.predict_concurrency` must be an integer" in error_of("runtime: {predict_concurrency: lots}\n")


def test_bad_values_are_explained():
    assert "unknown accelerator 'T5'" in error_of("resources: {accelerator: T5}\n")
    assert "py39 ... py314" in error_of("python_version: py27\n")


def test_every_bad_value_is_named_at_once_with_its_line():
    with pytest.raises(ConfigError) as info:
        parse_config("model_name: x\nresources:\n  use_gpu: maybe\n  memory: 2 GB\n", source="nb.ipynb, cell 2",
                     line_offset=1)
    message = str(info.value)
    assert message.startswith("nb.ipynb, cell 2: 2 problems: line 4: `resources.use_gpu` must be true or false")
    assert "; line 5: `resources.memory`: memory must be a size like '2Gi'" in message
    assert message.endswith("Fix those values and run the cell again.")


def test_a_near_miss_of_a_model_metadata_key_something_reads_gets_a_note():
    notes = []
    config = parse_config("model_metadata:\n  batchng: {max_batch_size: 8}\n  tags: [demo]\n", warnings=notes)
    assert config.batching is None and config.model_metadata["tags"] == ["demo"]  # kept, as Truss keeps any key
    assert notes == ["config.yaml, line 2: neither kernel-magics nor Truss reads model_metadata.batchng; did you mean "
                     "`batching`?"]
    notes.clear()
    parse_config("model_metadata: {caching: true, example_model_output: 1, bathcing: {}}\n", warnings=notes)
    assert [n.split("model_metadata.")[1].split(";")[0] for n in notes] == ["bathcing"], notes  # other words: no note


def test_duplicate_keys_rejected():
    assert "line 2: `model_name` is set twice" in error_of("model_name: a\nmodel_name: b\n")


def test_secret_values_are_refused_and_never_echoed():
    msg = error_of("secrets:\n  token: sk-CANARY-123\n")
    assert "line 2" in msg and "TRUSS_SECRET_token" in msg
    assert "CANARY" not in msg


def test_not_a_mapping():
    assert "must be a mapping" in error_of("- a\n- b\n")


def test_yaml_round_trip_keeps_what_was_set():
    text = "model_name: m\nrequirements:\n- torch\nsecrets:\n  tok: null\n"
    assert parse_config(text).to_yaml() == text
    # What to_yaml writes reads back as the same config, every section and Truss-only key included.
    full = parse_config("model_name: m\nrequirements: [torch==2.13.0]\nresources: {accelerator: 'A10G:2', cpu: 2, "
                        "memory: 4Gi}\nsecrets: {tok: null}\nenvironment_variables: {FLAG: true}\n"
                        "runtime: {predict_concurrency: 4}\nmodel_metadata: {a: [1, 2]}\nsystem_packages: [ffmpeg]\n")
    again = parse_config(full.to_yaml())
    assert isinstance(again, ModelConfig) and again == full and again.to_dict() == full.to_dict()


def test_an_example_input_of_numbers_is_written_a_row_a_line():
    """A new user's example input of feature rows took one number a line in config.yaml (300 lines for 50 rows of
    six). Lists of numbers are written on one line now; lists of strings (requirements) a line each, as before."""
    from kernel_magics.core.export import materialize_config

    example = {"inputs": [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3]], "names": ["a", "b"], "flags": [True, None]}
    text = materialize_config(parse_config("model_name: m\n"), ["numpy==2.0.0", "torch==2.13.0"], example)
    assert ("requirements:\n- numpy==2.0.0\n- torch==2.13.0\n" in text and "  - [5.1, 3.5, 1.4, 0.2]\n"
            "    - [6.2, 2.9, 4.3, 1.3]\n" in text and "    names:\n    - a\n    - b\n" in text
            and "    flags: [true, null]\n" in text), text
    assert yaml.safe_load(text)["model_metadata"]["example_model_input"] == example
