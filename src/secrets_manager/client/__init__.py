"""Clients of the secrets-manager service."""

from secrets_manager.client.remote import RemoteStore, TlsFiles

__all__ = ["RemoteStore", "TlsFiles"]
