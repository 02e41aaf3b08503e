"""The core: the Truss contract, config, secrets, the cells → model.py closure, export, Truss directories.

Nothing here imports IPython, ipywidgets, HTTP frameworks or Ray: the notebook
adapters (:mod:`kernel_magics.notebook`) and the serving adapters
(:mod:`kernel_magics.serving`) build on it, so the notebook and a deployment
run the very same code.
"""
