"""Built-in method families; importing this package registers them in `workbench.registry`."""
from workbench.methods import lowrank  # noqa: F401
from workbench.methods import pruning  # noqa: F401
from workbench.methods import quantization  # noqa: F401
from workbench.methods import tensor  # noqa: F401,E402
from workbench.methods import recurrent  # noqa: F401,E402
from workbench.recovery import qat  # noqa: F401,E402  (the "qat" recipe: PTQ start, then LSQ training)
from workbench.methods import fusion  # noqa: F401,E402
from workbench.methods import aware  # noqa: F401,E402  (svd_aware: activation-aware SVD)
