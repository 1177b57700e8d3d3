"""Privacy at the edge: DP-SGD (Opacus), the per-site ledger, the memorization audit, the release gate.

Imports only ``gem3d`` (and Opacus); nothing in ``gem3d`` imports this package.
"""
