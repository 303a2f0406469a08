"""Scripts and the ``iqa`` command line that reproduce the paper's tables and figures."""
