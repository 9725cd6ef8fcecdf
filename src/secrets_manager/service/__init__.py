"""The gRPC service: authenticate (mTLS) → authorise (policy) → call the store → audit → respond.

Thin by design (DESIGN.md §6): no crypto and no SQL here.
"""

from secrets_manager.service.config import ServerConfig, load_config
from secrets_manager.service.server import SecretsServicer, build_server, run_server

__all__ = ["SecretsServicer", "ServerConfig", "build_server", "load_config", "run_server"]
