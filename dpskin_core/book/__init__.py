"""The book layer: the experiment registry (``experiments.yml``), sweeps over recipes, the
tables and figures of the results chapters, and the runner that executes the notebooks with
papermill and builds the Jupyter Book.

The top layer of the library: it imports the attacks, training and data layers.
"""
