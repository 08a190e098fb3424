"""Server-side methods by `baseline` name: federated fine-tuning itself and the references that
bracket it. A new one is a file here with a `ServerMethod` subclass, and a line below."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedllm.core.server_methods.base import ServerMethod
from fedllm.core.server_methods.centralized import Centralized
from fedllm.core.server_methods.local_only import LocalOnly
from fedllm.methods import PeftMethod

if TYPE_CHECKING:
    from fedllm.config import RunConfig

SERVER_METHODS: dict[str, type[ServerMethod]] = {m.name: m for m in (ServerMethod, Centralized, LocalOnly)}


def build_server_method(cfg: RunConfig, method: PeftMethod) -> ServerMethod:
    """The run's server-side method (`baseline`)."""
    return SERVER_METHODS[cfg.baseline](cfg, method)


__all__ = ["SERVER_METHODS", "Centralized", "LocalOnly", "ServerMethod", "build_server_method"]
