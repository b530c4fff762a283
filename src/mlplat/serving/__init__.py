"""Serving: Triton model repositories, Triton clients, the local backend, predict, A/B routing."""
from __future__ import annotations

from .client import AsyncTritonClient, TritonClient
from .gateway import ABGateway, Decision
from .local import LocalBackend
from .predict import Prediction
from .server import TritonServer, build_server_venv
from .service import ServingService
from .triton_repo import DynamicBatching, QueuePolicy, TritonExport

__all__ = ["ABGateway", "AsyncTritonClient", "Decision", "DynamicBatching", "LocalBackend", "Prediction",
           "QueuePolicy", "ServingService", "TritonClient", "TritonExport", "TritonServer", "build_server_venv"]
