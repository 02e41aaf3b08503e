"""kernel-magics: turn notebook cells into a deployable Truss model.

``%load_ext kernel_magics`` registers the magics. Everything heavy (IPython's
magic machinery, torch, FastAPI) is imported only when used.
"""

__version__ = "0.1.0"
__all__ = ["load_ipython_extension", "unload_ipython_extension", "__version__"]


def load_ipython_extension(ipython) -> None:
    """Register the model magics with an IPython shell (``%load_ext kernel_magics``)."""
    from .notebook.bench_magics import BenchMagics
    from .notebook.define_magics import DefineMagics
    from .notebook.magics import ModelMagics
    from .notebook.run_magics import RunMagics, wait_for_spare_planning
    from .notebook.ship_magics import ShipMagics

    magics = ModelMagics(ipython)
    ipython.register_magics(magics)
    for adapter in (DefineMagics, RunMagics, ShipMagics, BenchMagics):
        ipython.register_magics(adapter(ipython, magics))
    ipython.events.register("pre_run_cell", magics.note_cell)
    ipython.events.register("post_run_cell", magics.record_cell)
    ipython.events.register("pre_execute", wait_for_spare_planning)
    from .notebook.completion import install as complete_options
    from .notebook.frontend import apply_settings

    complete_options(ipython)  # Tab after `%model_export --` offers its options

    # The lab extension's channel: follows the host's predictions, applies the extension's settings.
    magics.frontend.start(magics.host, lambda settings: apply_settings(magics, settings))


def unload_ipython_extension(ipython) -> None:
    """Stop the background loop; the magics stay registered until the kernel restarts."""
    magics = ipython.magics_manager.registry.get("ModelMagics")
    if magics is not None:
        try:
            magics.runner.stop()
        finally:
            magics.frontend.stop()
        from .notebook.run_magics import wait_for_spare_planning

        for event, hook in (("pre_run_cell", magics.note_cell), ("post_run_cell", magics.record_cell),
                            ("pre_execute", wait_for_spare_planning)):
            try:
                ipython.events.unregister(event, hook)
            except ValueError:
                pass
