"""The Python SDK: `get_credentials()` and the clients behind it (DESIGN.md section 7).

    creds = await get_credentials()              # or get_credentials_sync() without asyncio
    api_key = creds["market-connector/BINANCE_API_KEY"].reveal_text()

Configuration comes from the environment (SECRETS_MANAGER_ADDR, SECRETS_MANAGER_CERT/KEY/CA; see
`_config`). The implementation modules are private; this `__all__` is the supported surface, and
`RemoteStore` / `TlsFiles` are the plain `SecretStore` over gRPC that the CLI uses.
"""

from secrets_manager.client._async import AsyncClient
from secrets_manager.client._client import Client
from secrets_manager.client._credentials import AmbiguousNameError, Credentials
from secrets_manager.client._default import (
    aclose_default_client,
    close_default_client,
    default_client,
    get_credentials,
    get_credentials_sync,
)
from secrets_manager.client._logging import SecretRedactionFilter, install_log_redaction
from secrets_manager.client._notify import SecretChanged, Subscription
from secrets_manager.client.remote import RemoteStore, TlsFiles

__all__ = [
    "AmbiguousNameError",
    "AsyncClient",
    "Client",
    "Credentials",
    "RemoteStore",
    "SecretChanged",
    "SecretRedactionFilter",
    "Subscription",
    "TlsFiles",
    "aclose_default_client",
    "close_default_client",
    "default_client",
    "get_credentials",
    "get_credentials_sync",
    "install_log_redaction",
]
