"""Which URLs a webhook may be sent to: those the operator allowed (`webhooks.allowed_destinations`), and never an
address inside the deployment (loopback, private, link-local, cloud metadata) unless `allow_private_addresses`."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

# Cloud metadata services answer on these; link-local covers 169.254.169.254, but name them for the message.
METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


class DestinationRefused(ValueError):
    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


def check_allowed(url: str, allowed: list[str]) -> None:
    """`url` must start with one of the allowed prefixes (scheme, host and path, e.g. `https://hooks.example.com/`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DestinationRefused("must be an http(s) URL with a host", "webhooks.allowed_destinations")
    if parts.username or parts.password:
        raise DestinationRefused("must not carry credentials", "webhooks.allowed_destinations")
    if not any(url.startswith(prefix) for prefix in allowed):
        shown = ", ".join(allowed) if allowed else "none configured"
        raise DestinationRefused(
            f"not among the destinations the operator allows (webhooks.allowed_destinations: {shown})",
            "webhooks.allowed_destinations",
        )


def refused_address(address: str) -> str | None:
    """Why this address is inside the deployment (None: it is a public address)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_private or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
        return "a private or reserved address"
    return None


async def check_addresses(url: str, allow_private: bool) -> None:
    """Every address the URL's host resolves to must be public (checked again before each delivery, as DNS may
    change)."""
    if allow_private:
        return
    parts = urlsplit(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DestinationRefused(f"its host does not resolve ({exc})", "webhooks.allowed_destinations") from exc
    for info in infos:
        why = refused_address(info[4][0])
        if why is not None:
            raise DestinationRefused(
                f"its host resolves to {why} ({info[4][0]}); set webhooks.allow_private_addresses to allow it",
                "webhooks.allow_private_addresses",
            )
