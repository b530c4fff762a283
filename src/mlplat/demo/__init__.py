"""``mlplat demo``: the fintech story end to end, on embedded defaults, in a fresh folder.

Usage::

    from mlplat.demo import run_demo
    summary = run_demo("./mlplat-demo")            # or online_store="redis://...", triton_url="host:8001"

See :mod:`mlplat.demo.journey` for the steps.
"""
from __future__ import annotations

from .data import generate_transactions
from .journey import run_demo

__all__ = ["generate_transactions", "run_demo"]
