"""The shipped suite files (``*.yaml``), installed with the package as data."""
