"""The notebook adapters: IPython magics, live views (ipywidgets) and the JupyterLab extension's channel."""
