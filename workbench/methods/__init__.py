"""Built-in method families; importing this package registers them in `workbench.registry`."""
from workbench.methods import lowrank  # noqa: F401
