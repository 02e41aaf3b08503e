"""kernel-magics: turn notebook cells into a deployable Truss model.

``%load_ext kernel_magics`` registers the magics. Everything heavy (IPython's
magic machinery, torch, FastAPI) is imported only when used.
"""

__version__ = "0.1.0"
__all__ = ["load_ipython_extension", "unload_ipython_extension", "__version__"]


def load_ipython_extension(ipython) -> None:
    """Register the model magics with an IPython shell (``%load_ext kernel_magics``)."""
    from .notebook.magics import ModelMagics

    magics = ModelMagics(ipython)
    ipython.register_magics(magics)
    ipython.events.register("post_run_cell", magics.record_cell)
    magics.frontend.start()


def unload_ipython_extension(ipython) -> None:
    """Stop the background loop; the magics stay registered until the kernel restarts."""
    magics = ipython.magics_manager.registry.get("ModelMagics")
    if magics is not None:
        magics.runner.stop()
        try:
            ipython.events.unregister("post_run_cell", magics.record_cell)
        except ValueError:
            pass
