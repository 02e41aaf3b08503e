"""Fixtures shared by the test modules, the tiers (markers) every test gets without editing it, and the
check that the suite leaves nothing behind in the temp dir or the home directory."""

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Where PYTHONDONTWRITEBYTECODE is set (this machine and CI set it), pytest rewrote the assertions of every test
# module again in every test process: about 2 s of each process's start. This process may keep them in
# tests/__pycache__ (ignored by git). (`make` unexports the variable: there the kernels and servers the tests start
# write .pyc files too, as on a user's machine.)
sys.dont_write_bytecode = False
# nbformat imports jsonschema, which imports rfc3987_syntax when it is installed (jupyter_server's extras bring it)
# and builds an IRI grammar: about 2.5 s of CPU in every test process, for a format no notebook schema uses.
sys.modules.setdefault("rfc3987_syntax", None)

from kernel_harness import Kernel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _httpx_with_one_ssl_context() -> None:
    """httpx.get/post/... build a client, and with it an SSL context loading certifi's certificates: 46 ms of CPU
    per call, for requests that are all plain HTTP to 127.0.0.1. The tests poll servers every 50 ms while they
    start, so each start cost a test process about half a core, taken from the server it waited for. Every
    top-level call here gets one context made once (httpx takes a ready SSLContext as ``verify``); the
    request itself, a fresh connection per call, is unchanged."""
    import functools

    import httpx

    context = httpx.create_ssl_context()
    for name in ("request", "stream", "get", "options", "head", "post", "put", "patch", "delete"):
        call = getattr(httpx, name)
        if not getattr(call, "_one_ssl_context", False):
            @functools.wraps(call)
            def with_context(*args, _call=call, **kwargs):
                kwargs.setdefault("verify", context)
                return _call(*args, **kwargs)
            with_context._one_ssl_context = True
            setattr(httpx, name, with_context)


_httpx_with_one_ssl_context()


# ---------------------------------------------------------------- tiers: markers applied at collection
#
# `make check` runs `-m "not (ray or browser or truss_ref or package or gallery or slow)"`; `make test` runs all.

# What one test process runs all of, with pytest -n and --dist loadgroup: one Ray cluster, one JupyterLab, one
# package build.
GROUPS = ("ray", "browser", "package")
# A whole module that needs what a marker names.
MODULE_MARKS = {
    "test_ray": "ray", "test_ray_cluster": "ray",
    "test_extension": "browser",
    "test_package": "package",
    "test_gallery": "gallery",
    "test_truss_conformance": "truss_ref",
}
# A fixture that needs it (pytest resolves fixtures used by fixtures, so indirect use counts too).
FIXTURE_MARKS = {"ray_cluster": "ray", "dist": "package", "truss_validate": "truss_ref", "truss_server": "truss_ref"}
# A global name the test function's own code uses (what a fixture cannot show: a helper called in the body).
NAME_MARKS = {"serve_truss": "truss_ref", "truss_venv_with_models": "truss_ref", "truss_reference_python": "truss_ref",
              "LocalCluster": "ray"}
# The tests that keep `make check` over a minute, with nothing else to mark them: 4 s or more each (by
# originalname: every parameter of it) in `--durations` runs of the check tier on this 2-core machine while
# other test runs loaded it (about 1 s or more when it is quiet): CLI exports, servers and checks in fresh
# processes, kernels of their own.
# By module::name (parameters included); a name that matches no test is a warning in the summary.
SLOW = {
    "test_cli::test_a_port_in_use_is_exit_code_3",
    "test_cli::test_a_stopped_or_failed_saved_stream_is_not_replayed",
    "test_cli::test_a_prediction_on_the_last_line_of_a_cell_is_replayed_as_the_kernel_replays_it",
    "test_cli::test_export_of_a_streaming_notebook_replays_its_saved_streams",
    "test_cli::test_labextension_is_installed_prebuilt_and_enabled",
    "test_cli::test_predict_errors_and_their_exit_codes",
    "test_cli::test_predict_prints_the_answer_and_sends_the_models_prints_to_stderr",
    "test_contract::test_metrics_count_requests_and_latency_per_route",
    "test_contract::test_the_notebook_answers_the_same",
    "test_export::test_a_prediction_made_with_headers_is_replayed_with_the_same_request",
    "test_export::test_cli_bad_notebooks",
    "test_export::test_cli_validate",
    "test_export::test_exporting_a_large_value_adds_only_a_small_buffer_to_the_kernel",
    "test_export::test_force_refuses_files_the_export_did_not_write_unless_given_twice_and_never_deletes_a_git",
    "test_export::test_kernel_export_errors_leave_nothing_behind",
    "test_export::test_show_magics",
    "test_export::test_the_cli_replays_a_request_taking_predict_saved_in_the_notebook_with_a_servers_request",
    "test_export::test_what_the_check_writes_in_its_working_directory_stays_out_of_the_export",
    "test_faults::test_a_client_leaving_between_two_yields_keeps_the_slot_until_the_generator_closes",
    "test_faults::test_a_helper_that_load_leaves_running_does_not_hold_the_export",
    "test_faults::test_a_secret_inside_errors_is_redacted_everywhere_it_is_shown",
    "test_faults::test_an_interrupted_sync_predict_keeps_the_slot_until_it_returns",
    "test_faults::test_bad_input_in_the_magics_gets_a_one_paragraph_usage_error",
    "test_faults::test_broken_inputs_get_one_line_and_exit_code_1",
    "test_faults::test_clients_leaving_during_an_upload_log_one_line_each",
    "test_faults::test_config_folders_a_data_symlink_loop_and_an_alias_bomb_get_one_line_from_the_cli",
    "test_faults::test_data_dot_is_refused_before_copying_anything",
    "test_faults::test_export_force_never_replaces_the_notebooks_folder_or_a_parent_or_the_working_directory",
    "test_faults::test_force_over_a_symlink_and_over_read_only_parts_leaves_nothing_behind",
    "test_faults::test_interrupting_model_load_stops_load_and_a_retry_does_not_wait_for_it",
    "test_faults::test_kernel_export_after_cd_refuses_the_notebooks_folder",
    "test_faults::test_kill_9_during_an_export_the_checker_dies_and_the_next_export_cleans_up",
    "test_faults::test_logging_in_load_shows_once_without_jupyterlab_and_print_once_with_a_view",
    "test_faults::test_model_secret_in_a_headless_run_uses_the_environment",
    "test_faults::test_predicts_during_a_reload_of_a_served_model_get_503_not_500",
    "test_faults::test_redefining_during_a_background_load_applies_after_it",
    "test_faults::test_the_server_logs_of_a_mid_stream_error_are_redacted",
    *(f"test_faults::test_two_exports_to_one_new_target_at_once_never_both_write_it[{case}]"
      for case in ("two notebooks", "one notebook twice")),
    "test_faults::test_unload_releases_what_a_failed_load_and_a_failed_predict_hold",
    "test_fidelity::test_a_value_changed_after_the_recorded_predictions_fails_the_replay",
    "test_fidelity::test_a_value_load_read_and_a_cell_changed_after_the_load_is_named_as_the_cause",
    "test_fidelity::test_a_name_a_later_star_import_binds_again_travels_as_the_notebook_has_it",
    "test_fidelity::test_a_value_that_cannot_be_saved_refuses_the_export_naming_it",
    "test_fidelity::test_truss_compatibility_warnings_in_the_notebook",
    "test_fidelity_verified::test_a_value_holding_a_class_edited_and_run_again_since_is_refused_until_it_is_made_again",
    "test_fidelity_verified::test_an_earlier_value_only_its_source_can_carry_is_proven_by_the_replay_or_refused",
    "test_fidelity_verified::test_a_load_changed_by_a_hot_swap_after_the_load_is_named_when_the_replay_differs",
    "test_fidelity_verified::test_a_name_the_model_reads_that_the_notebook_deleted_is_exported_with_a_warning",
    "test_fidelity_verified::test_a_closure_a_notebook_function_made_is_re_run_and_verified_and_one_whose_state_changed_is_refused",
    "test_fidelity_verified::test_cells_run_before_load_ext_count_in_the_kernel_and_in_execute",
    "test_fidelity_verified::test_execute_accepts_what_the_export_accepts_a_link_to_an_empty_folder_and_its_own_export",
    "test_fidelity_verified::test_a_module_attribute_changed_out_of_sight_travels_with_the_whole_module",
    "test_fidelity_verified::test_execute_stops_at_a_failing_cell_naming_it_and_exports_nothing",
    "test_fidelity_verified::test_cells_are_counted_as_jupyter_numbers_them_code_cells_only",
    "test_export::test_run_all_again_replaces_the_notebooks_own_export_and_nothing_else",
    "test_fidelity_verified::test_an_unseeded_generator_that_predict_consumes_is_named_in_the_refusal",
    "test_fidelity_verified::test_the_local_module_travels_in_packages_and_its_change_after_the_import",
    "test_fingerprint::test_tensors_and_modules_compare_by_value_not_by_device_or_identity",
    "test_magics::test_extension_loads_from_ipython_config",
    "test_magics::test_load_passes_truss_kwargs_and_reports_device",
    "test_magics::test_tab_completes_the_options_of_the_magics_not_python_names",
    *(f"test_fidelity_verified::test_a_global_that_load_changes_is_compared_as_both_loads_left_it[{case}-not loaded]"
      for case in ("a literal", "a computed list, verified", "a computed list, replayed")),
    "test_magics::test_secret_from_environment_never_reaches_output",
    "test_readme::test_every_readme_cell_runs_as_pasted",
    "test_saved_views::test_saved_views_in_nbconvert_html_wrap_whole_words_and_show_the_whole_load_log",
    "test_secrets::test_a_notebook_run_with_nbclient_and_saved_holds_no_secret",
    "test_secrets::test_an_export_holding_a_secret_is_refused_naming_the_value_and_keeps_the_previous_one",
    "test_secrets::test_errors_the_kernel_sends_are_redacted_whatever_holds_the_secret",
    "test_secrets::test_the_cli_export_refuses_a_secret_from_its_environment",
    "test_server::test_32_concurrent_requests_none_lost",
    "test_server::test_a_served_child_stops_when_its_kernel_dies",
    "test_server::test_a_slow_reader_pauses_the_generator_and_keeps_memory_bounded",
    "test_server::test_client_disconnect_closes_the_generator_and_frees_the_slot[uvicorn]",
    "test_server::test_failed_load_and_missing_model_exit_non_zero",
    "test_server::test_liveness_and_readiness_answer_during_a_long_sync_predict",
    "test_server::test_missing_secret_fails_the_load_with_one_paragraph",
    "test_server::test_model_serve_from_the_notebook",
    "test_server::test_pydantic_input_errors_and_schema[uvicorn]",
    "test_server::test_readiness_is_503_while_loading_and_liveness_answers",
    "test_server::test_requirement_mismatches_are_warned_about",
    "test_server::test_routes_errors_and_headers[uvicorn]",
    "test_server::test_secrets_from_a_secrets_dir",
    "test_server::test_sigterm_finishes_the_request_in_flight",
    "test_server::test_stream_arrives_chunk_by_chunk[uvicorn]",
    "test_serving_edge::test_45_stalled_streams_leave_threads_for_probes_and_sync_predicts",
    "test_serving_edge::test_a_stalled_reader_loses_its_stream_after_streaming_read_timeout",
    "test_serving_edge::test_an_import_error_is_a_failed_load_with_the_users_frames",
    "test_serving_edge::test_liveness_answers_while_model_py_imports_and_readiness_waits",
    "test_serving_edge::test_request_bodies_are_bounded_by_max_body_size",
    "test_serving_edge::test_the_models_own_log_lines_are_redacted",
    "test_stand_in::test_it_keeps_the_port_until_the_other_listener_answers_through_the_deployment_then_hands_it_over",
    "test_truss_dir::test_layout_keys_and_package_dirs_through_validate_and_serve",
    "test_truss_dir::test_the_import_check_names_a_missing_package_and_the_flag_that_skips_it",
    "test_truss_dir::test_validate_replays_the_example_input",
    "test_truss_dir::test_validate_takes_any_path_from_any_working_directory",
    "test_values::test_every_format_saves_and_loads_as_the_notebook_has_it",
    "test_values::test_skops_is_imported_without_torch_and_leaves_nothing_blocked",
    "test_widgets::test_a_stopped_or_failed_stream_is_not_recorded_and_exports_still_replay",
    # Over 2.2 s each in the check tier's `--durations` on a slow hour (a ten-million-additions loop 1.4 to 1.7 s),
    # where the tier took 73 to 77 s; each leaves a sibling in the tier (the CLI's follow-ups: test_source's, in
    # process; `--again`: test_fidelity's; a load-read changed after the load: test_cli's and test_fidelity's).
    "test_fidelity_verified::test_a_registry_a_class_the_model_does_not_use_filled_or_an_array_drawn_by_a_class_body_is_refused",
    "test_cli::test_a_literal_a_later_cell_changes_is_exported_with_the_change_and_replayed",
    "test_fidelity_verified::test_a_load_that_opens_a_file_beside_the_notebook_is_told_how_to_ship_it",
    "test_serving_edge::test_a_generator_stuck_inside_a_chunk_loses_its_connection_at_the_timeout_and_is_closed_after",
    "test_fidelity_verified::test_a_global_that_load_changes_and_a_cell_changes_after_the_load_is_refused_until_loaded_again",
    "test_export::test_an_export_whose_check_never_loaded_a_model_that_failed_to_load_says_so",
    "test_fidelity::test_a_prediction_recorded_before_the_model_was_loaded_again_is_named_as_the_cause",
    "test_cli::test_the_cli_replays_the_answers_predict_again_saved",
    "test_serialization::test_half_a_million_floats_are_written_as_json_dumps_writes_them",
    "test_export::test_a_file_added_to_the_earlier_export_while_the_export_runs_is_not_replaced",
    "test_fidelity_verified::test_a_name_bound_again_out_of_sight_of_its_def_travels_as_the_notebook_has_it",
    "test_fidelity_verified::test_a_class_attribute_a_function_changed_is_refused_not_exported_as_the_class_body_has_it",
    "test_fidelity_verified::test_why_lists_what_a_cell_sets_on_a_module_beside_the_notebook_before_any_export",
    "test_fidelity_verified::test_values_computed_from_a_name_bound_again_later_export_from_the_kernel_as_the_notebook_has_them",
    "test_fidelity_verified::test_a_name_that_cannot_be_fingerprinted_is_named_as_not_verified",
    "test_fidelity_verified::test_a_value_made_before_its_class_was_edited_is_exported_with_the_class_it_was_made_with",
    # Cases whose test keeps another case in `make check` (60 s); what only `make test` then covers: Stop of an
    # async generator (check has the sync one), a spare refused for a submodule model.py never imported (check has
    # the module case), and a literal or a replayed list that load() changes after %model_load (check has each
    # without the load, and the verified list with it).
    "test_widgets::test_stop_button_ends_the_stream_while_the_cell_runs[True]",
    "test_checker::test_a_model_py_that_forgot_an_import_fails_in_the_spare_exactly_as_cold[submodule never imported]",
    "test_fidelity_verified::test_a_global_that_load_changes_is_compared_as_both_loads_left_it[a literal-loaded]",
    "test_fidelity_verified::test_a_global_that_load_changes_is_compared_as_both_loads_left_it[a computed list, replayed-loaded]",
    "test_widgets::test_interrupt_during_a_stream",
    "test_widgets::test_interrupt_during_a_sync_predict",
    "test_widgets::test_plain_text_fallback_and_no_widget_flag",
}


def pytest_configure(config):
    _private_temp_dir(config)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: there only with it
def pytest_xdist_node_collection_finished(node, ids):
    """``-n N --dist loadgroup``: stop at once when pytest-xdist lost the groups tests/conftest.py gives (Ray,
    browser, package). A test process marks an item's group in its node id (``...@ray``), and this process sends
    each group to one test process; when the mark does not take (pytest-xdist 3.8 on pytest 9.2, its issue
    1386), every test process started its own Ray cluster and JupyterLab, and nothing said so."""
    if node.config.getvalue("dist") != "loadgroup" or any("@" in nodeid for nodeid in ids):
        return
    grouped = [nodeid for nodeid in ids if Path(nodeid.split("::")[0]).stem in MODULE_MARKS
               and MODULE_MARKS[Path(nodeid.split("::")[0]).stem] in GROUPS]
    if grouped:
        pytest.exit(f"pytest-xdist did not keep the test groups of --dist loadgroup ({grouped[0]} has no group): "
                    f"each test process would start its own Ray cluster and JupyterLab. Install the versions "
                    f"pyproject.toml's test extra allows (`make venv`), or run without processes "
                    f"(`make test TEST_PROCESSES=`).", returncode=4)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config, items):
    seen = set()
    for item in items:
        module = item.module.__name__ if getattr(item, "module", None) else ""
        marks = {MODULE_MARKS.get(module)}
        marks |= {what for name, what in FIXTURE_MARKS.items() if name in item.fixturenames}
        marks |= {mark.name for mark in item.iter_markers() if mark.name in GROUPS}  # a parameter's own marks too
        if item.get_closest_marker("ray_cluster") is not None:
            marks.add("ray")
        code = getattr(getattr(item, "function", None), "__code__", None)
        if code is not None:
            marks |= {what for name, what in NAME_MARKS.items() if name in code.co_names}
        key = f"{module}::{item.name}"
        if key in SLOW or f"{module}::{item.originalname}" in SLOW:
            seen.add(key if key in SLOW else f"{module}::{item.originalname}")
            marks.add("slow")
        for mark in sorted(marks - {None}):
            item.add_marker(mark)
        # With pytest -n and --dist loadgroup, one process runs all of a group: one Ray cluster, one JupyterLab.
        group = next((g for g in GROUPS if g in marks), None)
        if group and config.pluginmanager.hasplugin("xdist"):
            item.add_marker(pytest.mark.xdist_group(group))
    _ray_cluster_tests_together(items)
    collected = {item.module.__name__ for item in items if getattr(item, "module", None)}
    stale = sorted(key for key in SLOW - seen if key.split("::")[0] in collected)
    whole = all(Path(arg).is_dir() for arg in config.args)  # a file or one test named: SLOW is only partly seen
    if stale and whole and not config.getoption("keyword") and not config.getoption("deselect"):
        # A warning, not an error: a test another change adds may be listed before that change lands.
        warnings.warn(pytest.PytestConfigWarning(f"tests/conftest.py SLOW names tests that do not exist (renamed?): "
                                                 f"{stale}"))


# ---------------------------------------------------------------- kernels

# The tests' kernels start no spare checker (ModelMagics.spare_checker): a spare is the next export's Python with the
# model's libraries imported, and most tests' kernels end soon after their last %model_load or export, so their
# spares were imported for nothing (about 110 a run). The export's check is then the cold one; the tests of the
# spare (test_checker.py) and the gallery notebooks ask for it, and KM_TEST_SPARES=1 gives every kernel one, as
# users have it. (Benchmarks keep the product's default.)
Kernel.spare_checkers = os.environ.get("KM_TEST_SPARES", "") not in ("", "0")
# Nor ipykernel's debugger (kernel_magics/notebook/kernel_launcher.py: 0.7 s of CPU less in each kernel's start).
# The gallery notebooks (nbclient) and JupyterLab's kernels in the browser tests start it, as users' kernels do.
Kernel.debugger = False


@pytest.fixture(scope="module")
def kernel():
    """One real IPython kernel per test module, with kernel_magics loaded."""
    k = Kernel()
    k.ok("%load_ext kernel_magics")
    yield k
    k.shutdown()


@pytest.fixture
def fresh_kernel():
    """Start kernels of a test's own: ``fresh_kernel(cwd=..., env=..., load_ext=True, spare_checker=True)``; every
    one is shut down when the test ends, passed or failed."""
    started = []

    def start(cwd=None, env=None, load_ext=False, spare_checker=None) -> Kernel:
        k = Kernel(env=env, cwd=str(cwd) if cwd is not None else None, spare_checker=spare_checker)
        started.append(k)
        if load_ext:
            k.ok("%load_ext kernel_magics")
        return k

    yield start
    for k in started:
        k.shutdown()


@pytest.fixture(autouse=True)
def _kernels_stop_with_their_test():
    """A kernel a test started and did not stop (a failed assertion before its shutdown) stops when the
    test ends; module and session kernels, started before, are left to their fixtures."""
    before = list(Kernel.running)
    yield
    for k in [k for k in Kernel.running if k not in before]:
        k.shutdown()


# ---------------------------------------------------------------- the real truss package

TRUSS_REFERENCE = REPO.parent / "shared" / "truss_reference"
TRUSS_VENV = Path(os.environ.get("TRUSS_REF_VENV", Path.home() / ".cache" / "truss-reference" / "venv"))


def _truss_python() -> Path:
    python = TRUSS_VENV / "bin" / "python"
    if not (python.exists() and TRUSS_REFERENCE.is_dir()):
        message = (f"the truss reference is not set up ({TRUSS_REFERENCE}/setup.sh creates {TRUSS_VENV}); "
                   "`make test` sets it up")
        if os.environ.get("KM_REQUIRE_TRUSS"):
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def truss_validate():
    """Validate a directory with the real truss 0.18.36 loader and config parser (validate.py's own code, in a
    process of the reference venv that stays: tests/truss_reference_helper.py)."""
    _truss_python()
    from server_harness import truss_reference

    def validate(path: Path) -> str:
        code, output = truss_reference("validate", path)
        assert code == 0, f"truss rejected {path}: {output}"
        return output

    return validate


# ---------------------------------------------------------------- the distributions

@pytest.fixture(scope="session")
def dist(tmp_path_factory):
    """The wheel and the sdist, built once for every test that reads them (test_package, test_repo: the package
    group, one process under -n): the prebuilt extension is reused, as in a release."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out),
                           str(REPO)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


# ---------------------------------------------------------------- one Ray cluster for the tests that deploy on Ray

_CLUSTER: dict = {}  # "cluster": the running one, or "failed": why it could not start; "last": the last test on it


def _ray_cluster_tests_together(items: list) -> None:
    """The tests that deploy on the shared cluster run one after another, where the first Ray test stood: the
    cluster starts for the first of them and stops after the last (pytest_runtest_teardown), instead of idling
    through the rest of the session (a head and two workers idle take about 0.15 of a core here) and beside the
    tests that start a Ray of their own. Where another plugin orders the tests otherwise (-n without loadgroup,
    --ff), the cluster stays up from the first until the last of them, as a session's would."""
    users = [item for item in items if _uses_the_cluster(item)]
    if not users:
        return
    first = next(i for i, item in enumerate(items) if item.get_closest_marker("ray") is not None)
    rest = [item for item in items if not _uses_the_cluster(item)]
    items[:] = rest[:first] + users + rest[first:]
    _CLUSTER["last"] = users[-1]


def _uses_the_cluster(item) -> bool:
    """It names the fixture, or asks for it while it runs and says so with the ray_cluster mark."""
    return "ray_cluster" in item.fixturenames or item.get_closest_marker("ray_cluster") is not None


@pytest.fixture
def ray_cluster():
    """A head and two worker nodes on this machine (127.0.0.1) with Ray Serve running, started once for the tests
    that use it, which run together: deploying on it takes seconds, where each `serve --engine ray` of its own
    starts a Ray and Serve. A cluster that could not start fails the later tests at once, without trying again."""
    pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'kernel-magics[ray]')")
    if "failed" in _CLUSTER:
        pytest.fail(f"the shared Ray cluster could not start: {_CLUSTER['failed']}")
    if "cluster" not in _CLUSTER:
        from ray_harness import LocalCluster
        from server_harness import free_port

        try:
            _CLUSTER["cluster"] = LocalCluster(workers=2, cpus=2, serve_port=free_port())
        except Exception as error:
            _CLUSTER["failed"] = f"{type(error).__name__}: {error}"
            raise
    return _CLUSTER["cluster"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the test's own fixtures are down first
    if nextitem is None or item is _CLUSTER.get("last"):
        _stop_the_cluster()


def _stop_the_cluster() -> None:
    cluster = _CLUSTER.pop("cluster", None)
    _CLUSTER.pop("failed", None)
    if cluster is not None:
        cluster.close()


@pytest.fixture(autouse=True)
def _ray_processes_without_the_iri_grammar(request, monkeypatch):
    """What a Ray test starts (a local Ray of `serve --engine ray`, a driver joining the cluster) inherits the
    environment of ray_harness.ray_environment: seconds less CPU in each Ray process, a start that keeps to Ray's
    30 s node deadline beside another busy test process."""
    if request.node.get_closest_marker("ray") is not None:
        from ray_harness import ray_environment

        monkeypatch.setenv("PYTHONPATH", ray_environment()["PYTHONPATH"])


# ---------------------------------------------------------------- nothing left behind
#
# With --check-leftovers the run has a temp dir of its own (TMPDIR, inherited by kernels, servers, Ray and
# the browser): at the end it must hold nothing but pytest's own folder, else the run fails naming what is
# left, and the folder goes. `--check-leftovers=all` (`make test`) also compares the system temp dir and the
# home directory before and after, for what ignores TMPDIR: that needs a machine where nothing else writes
# there meanwhile, so `make check` (run while other work goes on) checks its own temp dir only.

def pytest_addoption(parser):
    parser.addoption("--check-leftovers", choices=["tmpdir", "all"], default=None,
                     help="fail if the run leaves files in its temp dir (tmpdir), or also in the system temp dir "
                          "or the home directory (all)")


CACHES = "library-caches"  # in the run's temp dir: removed with it, not reported
# pip's own cache (the Truss reference's venv with the models gets numpy with pip): kept for the next run, not a
# leftover
HOME_CACHES = Path.home() / ".cache" / "pip"


def _private_temp_dir(config) -> None:
    if not config.getoption("check_leftovers"):
        return
    if "KM_TEST_TMPDIR" not in os.environ:  # xdist workers inherit the controller's
        system = tempfile.gettempdir()
        os.environ["KM_TEST_SYSTEM_TMP"] = system
        # pytest's own tmp_path folders stay where pytest keeps (and prunes) them: a failing run's are kept there.
        os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", system)
        os.environ["KM_TEST_TMPDIR"] = tempfile.mkdtemp(prefix="kmt-")
        everywhere = config.getoption("check_leftovers") == "all"
        config._km_before = ((_listing(Path(system)), _listing(Path.home()), _repository_state()) if everywhere
                             else (None, None, None))
        _private_home_dirs(Path(os.environ["KM_TEST_TMPDIR"], CACHES, "home"))
    os.environ["TMPDIR"] = os.environ["KM_TEST_TMPDIR"]
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    # A library's own cache is no test's leftover: torch puts its compile cache in the temp dir by default.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(os.environ["KM_TEST_TMPDIR"], CACHES, "torchinductor"))


def _private_home_dirs(home: Path) -> None:
    """What kernels, JupyterLab, jedi, matplotlib and GLib make in the home directory on first use (~/.ipython,
    ~/.jupyter, ~/.local/share/jupyter, ~/.cache/jedi ...) goes to the run's temp dir instead (inherited by
    every process the tests start): on a machine whose home directory has never seen them (a fresh CI machine)
    they were this run's leftovers, and a developer's own IPython or Jupyter settings could change what the
    tests see. pip's and uv's caches stay where they are (a fresh clone's set-up filled them; the tests that
    install reuse them), and so does ~/.config, where pip may find its package sources (Chromium's crash
    reports folder goes by browser_harness.launch_env)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ.setdefault("PIP_CACHE_DIR", str(cache / "pip"))
    os.environ.setdefault("UV_CACHE_DIR", str(cache / "uv"))
    from server_harness import HOME_VARIABLES

    for variable in (*HOME_VARIABLES, "KM_TEST_CONFIG_HOME"):
        folder = home / variable.lower()
        folder.mkdir(parents=True, exist_ok=True)  # (IPython falls back to a temp dir of its own otherwise)
        os.environ[variable] = str(folder)


def _repository_state() -> dict:
    """Each file git reports as changed or new (not ignored) in the repository, with its modification time:
    a test that writes a tracked file (docs/*.png) or leaves a new one in the tree shows up here."""
    done = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "-uall"], capture_output=True, text=True)
    state = {}
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        path = REPO / line[3:].split(" -> ")[-1]
        state[str(path)] = path.stat().st_mtime if path.exists() else None
    return state


def _listing(root: Path, depth: int = 2) -> set:
    """Paths under root to ``depth`` levels (enough to see a new folder, or a new file in a known one)."""
    found = set()
    todo = [(root, 0)]
    while todo:
        folder, level = todo.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            found.add(entry.path)
            if level + 1 < depth and entry.is_dir(follow_symlinks=False):
                todo.append((Path(entry.path), level + 1))
    return found


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown and pytest's own temp cleanup
def pytest_sessionfinish(session, exitstatus):
    _stop_the_cluster()  # still up when a run was interrupted or stopped inside a test on it
    config = session.config
    before = getattr(config, "_km_before", None)
    if before is None or hasattr(config, "workerinput"):
        return
    private = Path(os.environ["KM_TEST_TMPDIR"])
    left = sorted(p for p in _listing(private) if not Path(p).is_relative_to(private / CACHES))
    shutil.rmtree(private, ignore_errors=True)  # named below: the next run starts clean
    pytest_root = Path(os.environ["PYTEST_DEBUG_TEMPROOT"], f"pytest-of-{_user()}")  # pytest's, self-pruning
    if before[0] is not None:
        if str(pytest_root) not in before[0] and pytest_root.is_dir() and not any(pytest_root.iterdir()):
            pytest_root.rmdir()  # this run made it and a passing run leaves it empty
        system, home = _listing(Path(os.environ["KM_TEST_SYSTEM_TMP"])), _listing(Path.home())
        left += sorted(p for p in system - before[0] if not Path(p).is_relative_to(private)
                       and not Path(p).is_relative_to(pytest_root)) + sorted(
            p for p in home - before[1] if not Path(p).is_relative_to(HOME_CACHES))
        repository = _repository_state()
        left += sorted(p for p, mtime in repository.items() if p not in before[2] or before[2][p] != mtime)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if left:
        lines = "\n".join(f"  {p}" for p in left[:50]) + (f"\n  ... and {len(left) - 50} more" if len(left) > 50 else "")
        reporter.write_sep("=", "LEFT BEHIND BY THE TESTS", red=True, bold=True)
        reporter.write_line(f"The run left or changed these in its temp dir, the system temp dir, the home directory or "
                            f"the repository (make the test that wrote them clean up; those in the run's temp dir are "
                            f"removed now):\n{lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _user() -> str:
    import getpass

    return getpass.getuser()
