"""Tokens, their hashes, and CSRF tokens.

- Personal tokens (labeller links, the admin token, session cookies) are
  ``secrets.token_urlsafe(32)`` (256 bits). Only ``sha256(token)`` is stored: tokens are random,
  not passwords, so a fast unsalted hash is enough to make a stolen database file useless for
  logging in.
- A CSRF token is ``HMAC-SHA256(server secret, "csrf:" + binding)`` where the binding is the
  session cookie (or, before login, an anonymous cookie). A forged cross-site form post cannot
  read the cookie and so cannot compute the token; the server secret lives in the database so
  that tokens stay valid across a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_BYTES = 32
"""Entropy of every token, in bytes."""


def new_token() -> str:
    """A fresh URL-safe random token (``TOKEN_BYTES`` bytes of entropy)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """``sha256(token)`` as hex: what the database stores instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, expected_hash: str) -> bool:
    """Whether ``token`` hashes to ``expected_hash`` (constant-time comparison)."""
    return hmac.compare_digest(hash_token(token), expected_hash)


def csrf_token(secret: str, binding: str) -> str:
    """The CSRF token of a session (or anonymous) cookie value.

    Formula: ``hex(HMAC-SHA256(secret, "csrf:" + binding))``.
    """
    mac = hmac.new(secret.encode("utf-8"), f"csrf:{binding}".encode(), hashlib.sha256)
    return mac.hexdigest()


def csrf_valid(secret: str, binding: str | None, token: str | None) -> bool:
    """Whether ``token`` is the CSRF token of ``binding`` (False when either is missing)."""
    if not binding or not token:
        return False
    return hmac.compare_digest(csrf_token(secret, binding), token)
