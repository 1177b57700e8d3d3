"""Privacy at the edge: DP-SGD (Opacus), the per-site ledger, the memorization audit, the release gate.

Imports only ``gem3d`` (and Opacus); nothing in ``gem3d`` imports this package.
"""

import logging

_root_handlers = list(logging.getLogger().handlers)
import opacus  # noqa: E402, F401  (imported first here, so that the lines below can undo its logging setup)

# Opacus calls logging.basicConfig when it is imported (opacus/utils/module_utils.py), which gives
# the root logger a stderr handler: every Flower log line then printed twice, once in Flower's
# format and once as "date:LEVEL:message". Take back exactly the handlers that import added.
for _handler in list(logging.getLogger().handlers):
    if _handler not in _root_handlers:
        logging.getLogger().removeHandler(_handler)
