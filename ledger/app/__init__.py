"""The composition root: settings to roles (``serve``), the CLI and its tools, the demo, the
private servers of the embedded default, logging. The only package that imports ``consumers``
and ``projections``."""
