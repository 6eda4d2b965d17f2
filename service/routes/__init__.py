"""HTTP routes, one module per resource; state reaches them through the dependencies in ``deps``."""
