"""Server side of ``python -m workbench app``: a kernel manager that caps concurrent visitors.

Voilà starts one kernel per page visit. `CappedKernelManager` (given to Voilà as
``--VoilaConfiguration.multi_kernel_manager_class``) refuses to start more than ``max_kernels``
at once: the visitor's request then ends in HTTP 503 and Voilà's error page reads
"503: Busy: all N sessions of this app are in use, try again in a few minutes". A kernel
frees its place when the visitor closes the page, or when idle culling
(``MappingKernelManager.cull_idle_timeout``) shuts it down.

Invariant: kernels running + kernels starting <= max_kernels. The check and the count of
kernels being started happen with no ``await`` between them, so simultaneous visits on
the server's one event loop cannot both take the last place.
"""
from __future__ import annotations

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import Integer

BUSY_REASON = "Busy: all {n} sessions of this app are in use, try again in a few minutes"


class KernelLimitReached(web.HTTPError):
    """503 with a reason a visitor can read (Voilà's error page shows it as the heading)."""

    def __init__(self, limit: int):
        super().__init__(503, reason=BUSY_REASON.format(n=limit))
        self.limit = limit


class CappedKernelManager(AsyncMappingKernelManager):
    """``AsyncMappingKernelManager`` starting at most ``max_kernels`` kernels at once (0: no cap)."""

    max_kernels = Integer(8, min=0, config=True, help="Most kernels running at once (0: no limit).")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._starting = 0

    async def start_kernel(self, *args, kernel_id: str | None = None, **kwargs) -> str:
        if kernel_id is not None and kernel_id in self:  # an existing kernel: no new place taken
            return await super().start_kernel(*args, kernel_id=kernel_id, **kwargs)
        if self.max_kernels and len(self.list_kernel_ids()) + self._starting >= self.max_kernels:
            self.log.warning("kernel limit %d reached: visitor refused (503)", self.max_kernels)
            raise KernelLimitReached(self.max_kernels)
        self._starting += 1
        try:
            return await super().start_kernel(*args, kernel_id=kernel_id, **kwargs)
        finally:
            self._starting -= 1
