"""config.yaml as Pydantic models, with Truss's field names.

Parse at the edge (:func:`parse_config`), pass the typed :class:`ModelConfig`
inward, and write it back with :meth:`ModelConfig.to_dict`. Errors name the
YAML line, suggest the closest valid key, and never echo a secret value.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, ClassVar, Optional

import pydantic
import yaml

from .errors import ConfigError

__all__ = ["ModelConfig", "BatchSettings", "Resources", "Runtime", "AcceleratorSpec", "parse_config", "parse_quantity", "ACCELERATORS",
           "check_folder_setting"]

# Truss 0.18's accelerator names (truss/base/truss_config.py, `Accelerator`).
ACCELERATORS = (
    "T4", "L4", "A10G", "V100", "A100", "A100_40GB", "H100", "H200", "H100_40GB",
    "B200", "L40S", "RTX_PRO_6000", "B300", "GB300",
)
_PYTHON_VERSION = re.compile(r"^py3(9|1[0-4])$")

# Kubernetes quantities (k8s.io/apimachinery resource.Quantity): a decimal number with a binary
# suffix (Ki ... Ei), a decimal suffix (n u m k M G T P E) or an exponent (1e9, 2E3).
_QUANTITY = re.compile(r"^(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
                       r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)|(?P<exponent>[eE][+-]?[0-9]+))?$")
_SUFFIXES = {
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), None: Decimal(1),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
}
# What Truss 0.18 itself accepts of those (truss_config.Resources): cpu as a number or millicores,
# memory as a number or with a byte unit; memory in n/u/m (fractions of a byte) it refuses.
_TRUSS_SUFFIXES = {"cpu": {None, "m"}, "memory": {None, "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}}
_QUANTITY_EXAMPLES = {"cpu": "a number of cores like '1' or millicores like '500m'",
                      "memory": "a size like '2Gi', '512Mi' or '1G'"}


def parse_quantity(text: str) -> Decimal:
    """The value of a Kubernetes quantity (``500m`` → 0.5, ``1Pi`` → 2**50); ValueError if it is not one."""
    match = _QUANTITY.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a quantity")
    value = Decimal(match["number"])
    if match["exponent"]:
        return value * (Decimal(10) ** int(match["exponent"][1:]))
    return value * _SUFFIXES[match["suffix"]]


@dataclass(frozen=True)
class AcceleratorSpec:
    """``H100:2`` as Truss reads it: a GPU type and how many of them."""

    name: str
    count: int = 1

    @classmethod
    def parse(cls, value: Any) -> Optional["AcceleratorSpec"]:
        """From Truss's forms: ``None``, ``"T4"``, ``"H100:2"`` or ``{accelerator: H100, count: 2}``."""
        if value is None:
            return None
        if isinstance(value, dict):
            name, count = value.get("accelerator"), value.get("count", 1)
            if name is None:
                return None
        else:
            name, _, count_text = str(value).strip().partition(":")
            if count_text and not count_text.isdigit():
                raise ValueError(f"accelerator count {count_text!r} must be a positive integer")
            count = int(count_text) if count_text else 1
        if name not in ACCELERATORS:
            close = difflib.get_close_matches(str(name).upper(), ACCELERATORS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown accelerator {name!r}.{hint} Known: {', '.join(ACCELERATORS)}")
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise ValueError(f"accelerator count {count!r} must be a positive integer")
        return cls(name, count)

    def __str__(self) -> str:
        return self.name if self.count == 1 else f"{self.name}:{self.count}"


def _check_requirement(line: str) -> str:
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        Requirement(line)
    except InvalidRequirement as exc:
        reason = str(exc).splitlines()[0].rstrip(" (")
        raise ValueError(f"{line!r} is not a valid pip requirement ({reason}); write it like `torch==2.3.0`") from None
    return line


RequirementLine = Annotated[str, pydantic.AfterValidator(_check_requirement)]


def unmet_requirements(requirements: list[str]) -> list[tuple[str, str, Optional[str]]]:
    """(line, distribution, installed version or None) for each requirement this Python does not satisfy.

    Lines whose environment marker does not apply here are skipped.
    """
    import importlib.metadata

    from packaging.requirements import Requirement

    unmet = []
    for line in requirements:
        req = Requirement(line)  # the config validated every line
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append((line, req.name, None))
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            unmet.append((line, req.name, version))
    return unmet


def requirement_warnings(requirements: list[str]) -> list[str]:
    """One line per requirement that the installed distributions do not satisfy (``serve`` and ``validate`` run the
    model with what is installed here)."""
    return [f"warning: config.yaml requires {line} but {name} " + (f"{version} is installed" if version else "is not installed")
            for line, name, version in unmet_requirements(requirements)]


class _Section(pydantic.BaseModel):
    # Unknown keys are caught before validation (with "did you mean"); keys Truss
    # knows but we do not model are kept verbatim so a round trip loses nothing.
    model_config = pydantic.ConfigDict(
        extra="allow", protected_namespaces=(), validate_assignment=True
    )

    # Keys Truss accepts in this section that we pass through untouched.
    _passthrough: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def known_keys(cls) -> set[str]:
        """Every key this section accepts: modelled fields plus Truss pass-throughs."""
        return set(cls.model_fields) | set(cls._passthrough)


class Resources(_Section):
    """Compute resources: Truss derives ``use_gpu`` from ``accelerator``."""

    _passthrough: ClassVar[frozenset[str]] = frozenset({"instance_type", "node_count", "fabric"})

    accelerator: Optional[str] = pydantic.Field(
        None, description="GPU type, optionally with a count: T4, A10G, H100:2."
    )
    use_gpu: bool = pydantic.Field(False, description="Derived from accelerator.")
    cpu: str = pydantic.Field("1", description="CPU cores as a string: '1', '500m'.")
    memory: str = pydantic.Field("2Gi", description="Memory with units: '2Gi', '512Mi'.")

    @pydantic.field_validator("cpu", "memory", mode="before")
    @classmethod
    def _number_to_str(cls, value: Any) -> Any:
        # Truss requires strings here; `cpu: 1` is an easy slip, so accept it.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value

    @pydantic.field_validator("cpu", "memory")
    @classmethod
    def _check_quantity(cls, value: str, info: pydantic.ValidationInfo) -> str:
        field, example = info.field_name, _QUANTITY_EXAMPLES[info.field_name]
        match = _QUANTITY.fullmatch(value.strip())
        if not match:
            raise ValueError(f"{field} must be {example}, not {value!r}")
        if not match["exponent"] and match["suffix"] not in _TRUSS_SUFFIXES[field]:
            raise ValueError(f"{field} must be {example}, not {value!r} (Truss does not accept the unit "
                             f"{match['suffix']!r} for {field})")
        if parse_quantity(value) <= 0:
            raise ValueError(f"{field} must be more than zero, not {value!r}")
        return value

    @pydantic.field_validator("accelerator", mode="before")
    @classmethod
    def _check_accelerator(cls, value: Any) -> Optional[str]:
        spec = AcceleratorSpec.parse(value)
        return None if spec is None else str(spec)

    @pydantic.model_validator(mode="after")
    def _derive_use_gpu(self) -> "Resources":
        derived = self.accelerator is not None
        if self.use_gpu != derived:
            object.__setattr__(self, "use_gpu", derived)
        return self

    # The values, parsed once: what the Ray engine and any scheduler read.
    @property
    def gpu(self) -> Optional[AcceleratorSpec]:
        return AcceleratorSpec.parse(self.accelerator)

    @property
    def gpu_count(self) -> int:
        return self.gpu.count if self.gpu else 0

    @property
    def cpu_cores(self) -> float:
        return float(parse_quantity(self.cpu))

    @property
    def memory_in_bytes(self) -> int:
        return math.ceil(parse_quantity(self.memory))


class Runtime(_Section):
    """Runtime settings of the serving process."""

    _passthrough: ClassVar[frozenset[str]] = frozenset({
        "transport", "is_websocket_endpoint", "health_checks", "oidc", "remote_ssh",
        "egress_restrictions", "truss_server_version_override",
    })

    predict_concurrency: int = pydantic.Field(
        1, ge=1, description="How many predicts may run at once (preprocess and postprocess are outside the bound)."
    )
    streaming_read_timeout: int = pydantic.Field(60, ge=1, description="Seconds allowed between streamed chunks.")
    enable_tracing_data: bool = False
    enable_debug_logs: bool = False


@dataclass(frozen=True)
class BatchSettings:
    """``model_metadata.batching``: how a model with ``predict_batch`` gathers requests (core/batching.py)."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0

    KEYS: ClassVar[tuple[str, ...]] = ("max_batch_size", "max_wait_ms")
    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {"max_batch_size": (1, 4096), "max_wait_ms": (0, 10_000)}

    @classmethod
    def parse(cls, value: Any) -> "BatchSettings":
        """Read the section; a mistake raises ValueError with one sentence saying what to write."""
        example = "`batching: {max_batch_size: 32, max_wait_ms: 5}`"
        if value is None or value is True:
            return cls()
        if not isinstance(value, dict):
            raise ValueError(f"model_metadata.batching must be a mapping such as {example}, not {value!r}")
        for key in value:
            if key not in cls.KEYS:
                close = difflib.get_close_matches(str(key), cls.KEYS, n=1, cutoff=0.6)
                hint = f"did you mean `{close[0]}`?" if close else f"the keys are {' and '.join(cls.KEYS)}"
                raise ValueError(f"unknown key `model_metadata.batching.{key}` ({hint})")
        settings = {}
        for key, (low, high) in cls.LIMITS.items():
            if key not in value:
                continue
            got = value[key]
            integer = key == "max_batch_size"
            ok = isinstance(got, int) if integer else isinstance(got, (int, float))
            if isinstance(got, bool) or not ok or not low <= got <= high:
                kind = "an integer" if integer else "a number of milliseconds"
                raise ValueError(f"model_metadata.batching.{key} must be {kind} from {low:g} to {high:g}, not {got!r}")
            settings[key] = got
        return cls(**settings)

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000

    @property
    def predict_concurrency(self) -> int:
        """What runtime.predict_concurrency defaults to: enough requests reach the batcher to fill a batch
        while the previous one runs."""
        return 2 * self.max_batch_size


class ModelConfig(_Section):
    """The whole config.yaml. Field names and defaults follow Truss 0.18."""

    _passthrough: ClassVar[frozenset[str]] = frozenset({
        "description", "examples_filename", "external_data", "base_image", "requirements_file",
        "system_packages", "build", "build_commands", "docker_server", "model_cache", "weights",
        "bdn", "trt_llm", "training_checkpoints", "bis_llm", "input_type", "model_framework",
        "model_type", "model_module_dir", "model_class_filename", "bundled_packages_dir",
        "use_local_src", "cache_internal", "live_reload", "apply_library_patches", "spec_version",
        "hf_cache",
    })

    model_name: Optional[str] = pydantic.Field(None, description="Name shown for the deployment.")
    model_class_name: str = pydantic.Field("Model", description="Name of the model class in model.py.")
    python_version: Optional[str] = pydantic.Field(
        None, description="py39 ... py314; filled from the kernel at export when absent."
    )
    requirements: list[RequirementLine] = pydantic.Field(default_factory=list, description="pip requirement lines.")
    resources: Resources = pydantic.Field(default_factory=Resources)
    runtime: Runtime = pydantic.Field(default_factory=Runtime)
    # Names with null values. A Truss directory made elsewhere may give a default value, which Truss
    # serves (the environment or the secrets mount overrides it); %%model_config and exports never write one.
    secrets: dict[str, Optional[str]] = pydantic.Field(
        default_factory=dict, description="Secret names, each with a null value; values come from the environment."
    )
    environment_variables: dict[str, str] = pydantic.Field(default_factory=dict)
    model_metadata: dict[str, Any] = pydantic.Field(default_factory=dict)
    data_dir: str = pydantic.Field("data", description="Folder of data files, passed to the model as data_dir.")
    external_package_dirs: list[str] = pydantic.Field(default_factory=list)

    @pydantic.field_validator("model_class_name")
    @classmethod
    def _check_class_name(cls, value: str) -> str:
        if not value.isidentifier():
            raise ValueError(f"model_class_name must be a Python identifier, not {value!r}")
        return value

    @pydantic.field_validator("python_version")
    @classmethod
    def _check_python_version(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _PYTHON_VERSION.fullmatch(value):
            raise ValueError(f"python_version must be one of py39 ... py314, not {value!r}")
        return value

    @pydantic.field_validator("environment_variables", mode="before")
    @classmethod
    def _env_to_str(cls, value: Any) -> Any:
        # As Truss does: YAML booleans become "true"/"false", numbers their text.
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, (list, dict)):
                    raise ValueError(f"environment_variables.{k} must be a single value (text, a number or true/false), "
                                     f"not a {'list' if isinstance(v, list) else 'mapping'}: an environment variable "
                                     "holds one string. Write it as one string, for example \"a,b\"")
            return {
                k: (str(v).lower() if isinstance(v, bool) else v if isinstance(v, str) else str(v))
                for k, v in value.items()
            }
        return value

    @pydantic.field_validator("model_metadata")
    @classmethod
    def _check_batching(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "batching" in value and value["batching"] is not False:  # (false: off, as if absent)
            BatchSettings.parse(value["batching"])
        return value

    @pydantic.model_validator(mode="after")
    def _batching_concurrency(self) -> "ModelConfig":
        batching = self.batching
        if batching is None:
            return self
        runtime = self.runtime
        if "predict_concurrency" not in runtime.model_fields_set:
            # Truss's server lets predict_concurrency requests into predict at once: with the default of 1
            # the batcher would only ever see one. Set, so config.yaml carries it to the deployment.
            object.__setattr__(runtime, "predict_concurrency", batching.predict_concurrency)
            runtime.model_fields_set.add("predict_concurrency")
            self.model_fields_set.add("runtime")
        elif runtime.predict_concurrency < batching.max_batch_size:
            raise ValueError(
                f"runtime.predict_concurrency is {runtime.predict_concurrency}, so at most that many requests reach "
                f"the batcher and batches never fill to model_metadata.batching.max_batch_size "
                f"({batching.max_batch_size}). Remove predict_concurrency (batching sets it to "
                f"{batching.predict_concurrency}) or set it to at least {batching.max_batch_size}")
        return self

    @property
    def batching(self) -> Optional[BatchSettings]:
        """The model's batching settings, or None when it does not declare ``model_metadata.batching``."""
        if "batching" not in self.model_metadata or self.model_metadata["batching"] is False:
            return None
        return BatchSettings.parse(self.model_metadata["batching"])

    @property
    def secret_names(self) -> list[str]:
        return list(self.secrets)

    @property
    def secret_defaults(self) -> dict[str, str]:
        """Secret values written in config.yaml (only in a Truss directory made elsewhere)."""
        return {name: value for name, value in self.secrets.items() if value is not None}

    def to_dict(self, verbose: bool = False) -> dict[str, Any]:
        """The config as plain data: what the user set (``verbose`` adds defaults)."""
        data = self.model_dump(mode="json", exclude_unset=not verbose, by_alias=True)
        for name in ("resources", "runtime"):
            section = getattr(self, name)
            if name in data or verbose:
                data[name] = section.model_dump(mode="json", exclude_unset=not verbose)
        if "resources" in data and "accelerator" in data["resources"]:
            data["resources"]["use_gpu"] = self.resources.use_gpu
        data["secrets"] = {name: None for name in self.secrets} if self.secrets or verbose else None
        if data["secrets"] is None:
            del data["secrets"]
        return data

    def to_yaml(self, verbose: bool = False) -> str:
        """The config as YAML text, keys in the order they were written."""
        return yaml_text(self.to_dict(verbose))


class _Dumper(yaml.SafeDumper):
    """Block style, but a list of numbers (an example input's features, an embedding) on one line."""

    def represent_list(self, data):
        flow = bool(data) and all(isinstance(x, (int, float)) or x is None for x in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _Dumper.represent_list)


def yaml_text(data: Any) -> str:
    """YAML as config.yaml is written: keys in their order, block style, lists of numbers on one line."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


# --------------------------------------------------------------------------- parsing

_SECTIONS: dict[tuple[str, ...], type[_Section]] = {
    (): ModelConfig,
    ("resources",): Resources,
    ("runtime",): Runtime,
}


# A config is a few hundred nodes; YAML aliases can make a few hundred bytes expand to billions
# (the "billion laughs"). Anything past this many nodes once aliases are expanded is refused.
MAX_CONFIG_NODES = 100_000
# What aliases may add to a config on top of what is written out: a config that uses them for a few
# repeated blocks stays far below; a "bomb" just under MAX_CONFIG_NODES does not, and would be written
# out expanded by every export (a megabyte of config.yaml, seconds to write).
MAX_ALIAS_EXPANSION = 10_000
# libyaml's loader where PyYAML was built with it: the same results, many times faster on a big config.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAX_INT_DIGITS = 4300  # what Python's int() reads from text (sys.get_int_max_str_digits' default)


def parse_config(text: str, *, source: str = "config.yaml", line_offset: int = 0,
                 made_elsewhere: bool = False, warnings: Optional[list[str]] = None) -> ModelConfig:
    """Parse and validate config YAML; raise :class:`ConfigError` naming the line.

    ``line_offset`` shifts reported line numbers (a ``%%model_config`` cell's
    YAML starts on the cell's second line). ``made_elsewhere`` reads a Truss
    directory as Truss's own parser does: unknown keys and secret default values
    are accepted, each with a line appended to ``warnings``; a notebook config is
    strict, since ``truss push`` refuses unknown keys and we never write secret values.
    """
    warnings = warnings if warnings is not None else []
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}, line {mark.line + 1 + line_offset}, column {mark.column + 1}" if mark else source
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{where}: YAML syntax error: {problem}. Fix the YAML there{_again(source)}.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc}).") from None
    if root is None:
        return ModelConfig()
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(
            f"{source}, line {root.start_mark.line + 1 + line_offset}: the config must be a mapping of keys "
            "to values (for example `model_name: my-model`), not a single value or a list."
        )
    _check_recursion(root, set(), source, line_offset)
    memo: dict[int, int] = {}
    expanded = _expanded_size(root, memo)
    if expanded > MAX_CONFIG_NODES:
        raise ConfigError(
            f"{source}: the config expands to more than {MAX_CONFIG_NODES:,} values once its YAML aliases "
            "(*name) are expanded, far beyond any real config. Write the values out without nested aliases."
        )
    if expanded - len(memo) > MAX_ALIAS_EXPANSION:  # memo: one entry per node as written
        raise ConfigError(
            f"{source}: the config's YAML aliases (*name) add {expanded - len(memo):,} values to what is written "
            f"(at most {MAX_ALIAS_EXPANSION:,}), and an export would write every one of them out. Write the "
            "values out, or use fewer nested aliases."
        )
    lines: dict[tuple, int] = {}
    _index_lines(root, (), lines, line_offset, source)
    data = yaml.load(text, Loader=_LOADER)  # safe: SafeLoader's rules, size bounded above
    unknown: list[tuple[tuple, str]] = []
    _check_keys(data, (), unknown)
    _report_unknown_keys(unknown, lines, source, warnings if made_elsewhere else None)
    _check_secret_values(data, lines, source, warnings if made_elsewhere else None)
    try:
        config = ModelConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, lines, source)) from None
    warnings += _near_misses_in_metadata(config.model_metadata, lines, source)
    return config


# The model_metadata keys something reads: this package's batching, and Truss's example input.
_READ_METADATA = ("batching", "example_model_input")


def _near_misses_in_metadata(metadata: dict, lines: dict, source: str) -> list[str]:
    """model_metadata is the model's own (Truss keeps any key), so a misspelt `batchng:` is no error, but it would
    leave the model unbatched without a word: a note names the key it most likely meant."""
    notes = []
    for key in metadata:
        if not isinstance(key, str) or key in _READ_METADATA:
            continue
        # A slip of the keyboard (a letter dropped, added, changed or two swapped; two in a long key), not another
        # word such as `caching` or `example_model_output`.
        meant = [known for known in _READ_METADATA if _typos(key, known) <= (1 if len(known) <= 10 else 2)]
        if meant:
            notes.append(f"{_where(('model_metadata', key), lines, source)}: neither kernel-magics nor Truss reads "
                         f"model_metadata.{key}; did you mean `{meant[0]}`?")
    return notes


def _typos(a: str, b: str) -> int:
    """Edits from ``a`` to ``b``: letters inserted, deleted, replaced, or two neighbours swapped (optimal string
    alignment distance)."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def _check_recursion(node: yaml.Node, open_nodes: set[int], source: str, offset: int,
                     done: Optional[set[int]] = None) -> None:
    """Refuse an alias inside the node it names (``a: &a [*a]``): the value would contain itself."""
    done = set() if done is None else done
    if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) or id(node) in done:
        return  # (an alias seen before is checked once: a bomb's shared nodes are not walked again)
    if id(node) in open_nodes:
        raise ConfigError(f"{source}, line {node.start_mark.line + 1 + offset}: a YAML alias refers to a value that "
                          "contains it, so the value would contain itself without end. Write the value out instead "
                          "of the alias.")
    open_nodes.add(id(node))
    children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
    for child in children:
        _check_recursion(child, open_nodes, source, offset, done)
    open_nodes.discard(id(node))
    done.add(id(node))


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes ``node`` stands for with every alias expanded (aliases are shared nodes)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once instead of looping
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, memo) for item in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def _index_lines(node: yaml.Node, path: tuple, lines: dict, offset: int, source: str) -> None:
    """Record the line of every key path; reject duplicate keys as Truss does."""
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":int") and len(node.value) > _MAX_INT_DIGITS:
        dotted = ".".join(map(str, path)) or "the config"
        raise ConfigError(f"{source}, line {node.start_mark.line + 1 + offset}: `{dotted}` is an integer of "
                          f"{len(node.value):,} digits, and Python reads at most {_MAX_INT_DIGITS:,}. Quote it to "
                          "keep it as text.")
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1 + offset
            if key in seen:
                raise ConfigError(f"{source}, line {line}: `{'.'.join(path + (key,))}` is set twice. Keep one of them.")
            seen.add(key)
            lines[path + (key,)] = line
            _index_lines(value_node, path + (key,), lines, offset, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1 + offset
            _index_lines(item, path + (i,), lines, offset, source)


def _line_of(path: tuple, lines: dict) -> Optional[int]:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


def _where(path: tuple, lines: dict, source: str) -> str:
    line = _line_of(path, lines)
    return f"{source}, line {line}" if line else source


# What a key nearest by spelling does not mean (`gpu: 1` is not `cpu`).
_MEANT = {"gpu": "accelerator", "gpus": "accelerator", "num_gpus": "accelerator", "gpu_count": "accelerator"}


def _check_keys(data: Any, path: tuple, unknown: list[tuple[tuple, str]]) -> None:
    """Collects each unknown key's path with what it may have meant ("did you mean", else the valid keys)."""
    section = _SECTIONS.get(path)
    if section is None or not isinstance(data, dict):
        return
    known = section.known_keys()
    for key in list(data):
        key_path = path + (key,)
        if key not in known:
            close = ([_MEANT[key]] if key in _MEANT and _MEANT[key] in known else
                     difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6))
            unknown.append((key_path, f"did you mean `{'.'.join(path + (close[0],))}`?" if close else
                            f"valid keys here: {', '.join(sorted(section.model_fields))}"))
            continue
        _check_keys(data[key], key_path, unknown)


def _report_unknown_keys(unknown: list[tuple[tuple, str]], lines: dict, source: str,
                         warnings: Optional[list[str]]) -> None:
    """Unknown keys are errors, all at once (a user who fixes one typo should not meet the next on the next run),
    or, for a directory made elsewhere, warnings."""
    def dotted(key_path: tuple) -> str:
        return ".".join(map(str, key_path))

    def sentence(hint: str) -> str:
        return f"{hint[0].upper()}{hint[1:]}{'' if hint.endswith('?') else '.'}"

    if warnings is not None:
        # Truss 0.18.36 parses config.yaml with extra keys allowed (its server ignores them), and refuses them at
        # `truss push` (custom_types.validate_forbid_extra, called by the push).
        warnings += [f"{_where(key_path, lines, source)}: unknown key `{dotted(key_path)}` is ignored here and by "
                     f"Truss's server, but `truss push` refuses it. {sentence(hint)}" for key_path, hint in unknown]
        return
    if len(unknown) == 1:
        (key_path, hint), = unknown
        raise ConfigError(f"{_where(key_path, lines, source)}: unknown key `{dotted(key_path)}`. {sentence(hint)}")
    if unknown:
        listed: set[str] = set()  # (a section's valid keys once, not after each of its unknown keys)

        def said(key_path: tuple, hint: str) -> str:
            if hint.startswith("valid keys") and hint in listed:
                hint = "not a key there"
            listed.add(hint)
            line = _line_of(key_path, lines)
            return f"{f'line {line}: ' if line else ''}`{dotted(key_path)}` ({hint})"

        shown = "; ".join(said(key_path, hint) for key_path, hint in unknown)
        raise ConfigError(f"{source}: {len(unknown)} unknown keys: {shown}. Fix those keys{_again(source)}.")


def _check_secret_values(data: dict, lines: dict, source: str, warnings: Optional[list[str]]) -> None:
    secrets = data.get("secrets")
    if secrets is None:
        return
    if not isinstance(secrets, dict):
        raise ConfigError(
            f"{_where(('secrets',), lines, source)}: `secrets` must map secret names to null, "
            "for example `secrets: {hf_access_token: null}`."
        )
    for name, value in secrets.items():
        if value is None:
            continue
        # Never repeat the value: it may be a real credential.
        if warnings is None:
            raise ConfigError(
                f"{_where(('secrets', name), lines, source)}: secret `{name}` has a value in the config. "
                f"Secret values must never be written to config.yaml: write `{name}: null` and provide the "
                f"value through the environment variable TRUSS_SECRET_{name} (or %model_secret {name} in a notebook)."
            )
        if not isinstance(value, str):
            raise ConfigError(f"{_where(('secrets', name), lines, source)}: secret `{name}` must be null or a string.")
        warnings.append(
            f"{_where(('secrets', name), lines, source)}: secret `{name}` has a value in config.yaml; it is used as "
            f"the default, as Truss does (TRUSS_SECRET_{name} or the secrets mount override it). Keep secret "
            "values out of config.yaml."
        )


_FRIENDLY_TYPES = {
    "list_type": "a list", "dict_type": "a mapping", "string_type": "a string",
    "int_type": "an integer", "int_parsing": "an integer", "bool_type": "true or false",
    "bool_parsing": "true or false", "float_parsing": "a number",
}


def _describe_validation_error(exc: pydantic.ValidationError, lines: dict, source: str) -> str:
    """Every problem at once, in the order of their lines, so that one run of the cell shows what to fix."""
    problems = []
    for error in exc.errors():
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "config"
        expected = _FRIENDLY_TYPES.get(error["type"])
        if expected:
            message = f"`{dotted}` must be {expected}, not {type(error.get('input')).__name__}"
        else:
            message = f"`{dotted}`: {error['msg'].removeprefix('Value error, ')}"
        problems.append((_line_of(loc, lines), message))
    if len(problems) == 1:
        line, message = problems[0]
        return f"{source + (f', line {line}' if line else '')}: {message}. Fix that value{_again(source)}."
    problems.sort(key=lambda problem: problem[0] or 0)
    shown = "; ".join(f"line {line}: {message}" if line else message for line, message in problems[:8])
    more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""  # (a paragraph, not a page)
    return f"{source}: {len(problems)} problems: {shown}{more}. Fix those values{_again(source)}."


def _again(source: str) -> str:
    return " and run the cell again" if "cell" in source else ""


def check_folder_setting(setting: str, value: str, base_dir: Path) -> Optional[str]:
    """A folder the config names (data_dir, an external package dir), as an export takes it from the
    notebook's folder ``base_dir``: a home or root directory is refused (an export would copy or
    import all of it); one outside the notebook's folder gets a warning, returned."""
    path = (Path(base_dir) / os.path.expanduser(value)).resolve()
    home = Path.home().resolve()
    if path == Path(path.anchor) or path == home:
        what = "your home directory" if path == home else "the root directory"
        raise ConfigError(f"{setting}: {value!r} is {what} ({path}), and an export would take all of it. Point it "
                          "at a folder that holds only the model's files.")
    base = Path(base_dir).resolve()
    if path != base and base not in path.parents:
        return (f"{setting}: {value!r} is outside the notebook's folder ({path}); the export takes it from there. "
                "Check that it is the folder you mean.")
    return None
