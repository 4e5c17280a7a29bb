"""The master key (SPEC §2) and small AES-256-GCM helpers for secrets at rest.

The master key comes from ``UPI_MASTER_KEY`` (base64 of 32 bytes) or ``UPI_MASTER_KEY_FILE``.
The embedded default generates one into the data dir with mode 0600 and says so. It never
lands in the repository.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.config import Settings
from core.errors import ConfigError

__all__ = [
    "MasterKey",
    "SealedPiiError",
    "load_master_key",
    "master_key_file",
    "read_key_file",
    "write_key_file",
]

_log = logging.getLogger(__name__)


class MasterKey:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("master key must be 32 bytes")
        self._aead = AESGCM(key)
        # Derived from the key until the database's stored ones are bound (core/keyring.py).
        self._pseudonym_key = hmac.new(key, b"upi-engine/pseudonyms/v1", hashlib.sha256).digest()
        field_key = hmac.new(key, b"upi-engine/pii-fields/v1", hashlib.sha256).digest()
        self.use_field_key(_derived_key_id(field_key), field_key)

    def pseudonym_key_bytes(self) -> bytes:
        """The pseudonym key, for sealing it in the database (core/keyring.py)."""
        return self._pseudonym_key

    def use_pseudonym_key(self, key: bytes) -> None:
        """Take the database's pseudonym key: the one derived from the first master key, so
        that pseudonyms stay the same after the master key rotates (core/keyring.py)."""
        if len(key) != 32:
            raise ValueError("pseudonym key must be 32 bytes")
        self._pseudonym_key = key

    def pseudonym(self, value: str, purpose: str) -> bytes:
        """A keyed, stable stand-in for a PII value (HMAC-SHA256 under a key derived from
        the master key): joins and counts work on it; without the key it reveals nothing."""
        return self.digest(value.lower().encode(), purpose)[:16]

    def digest(self, data: bytes, purpose: str) -> bytes:
        """A keyed digest (HMAC-SHA256 under the pseudonym key) of ``data``, exact (no
        lower-casing): what is stored in place of a plain hash of something with PII in it,
        which a list of candidate VPAs would reverse."""
        return hmac.new(
            self._pseudonym_key, purpose.encode() + b"\0" + data, hashlib.sha256
        ).digest()

    def partition_key(self, payer_vpa: str) -> str:
        """The bus partition key of a payer's payments: a keyed pseudonym, so the outbox, the
        broker and the dead letters never hold the VPA, nor a hash of it that a list of VPAs
        would reverse. Stable across master-key rotations (the pseudonym key is)."""
        return self.pseudonym(payer_vpa, "partition").hex()

    @property
    def field_key_id(self) -> str:
        """The id of the PII field key: sealed PII names the key it was sealed under."""
        return self._field_key_id

    def field_key_bytes(self) -> bytes:
        """The PII field key, for sealing it in the database (core/keyring.py)."""
        return self._field_key

    def use_field_key(self, key_id: str, key: bytes) -> None:
        """Take the database's PII field key (core/keyring.py): like the pseudonym key it
        outlives master-key rotations (it is re-wrapped, not replaced), so that PII sealed
        before a rotation still opens after it."""
        if len(key) != 32:
            raise ValueError("field key must be 32 bytes")
        self._field_key_id = key_id
        self._field_key = key
        self._field_aead = AESGCM(key)

    def seal_pii(self, value: Any, aad: bytes) -> bytes:
        """``value`` (JSON-ready PII: a VPA, device data, a location) sealed with AES-256-GCM
        under the field key, bound to ``aad`` (what it belongs to: a row's key, an event's
        id), so that a sealed value copied elsewhere does not open there. The key id leads
        the bytes: ``<key id>:<nonce><ciphertext>``."""
        nonce = os.urandom(12)
        sealed = self._field_aead.encrypt(nonce, orjson.dumps(value), _PII_AAD + aad)
        return self._field_key_id.encode() + b":" + nonce + sealed

    def open_pii(self, sealed: bytes, aad: bytes) -> Any:
        """What :meth:`seal_pii` sealed. A value under another key, or altered, or moved to
        another ``aad``, raises :class:`SealedPiiError`."""
        key_id, sep, body = bytes(sealed).partition(b":")
        if not sep or key_id.decode(errors="replace") != self._field_key_id:
            raise SealedPiiError(
                f"sealed under field key {key_id.decode(errors='replace')!r}, not this"
                f" database's {self._field_key_id!r}"
            )
        try:
            return orjson.loads(self._field_aead.decrypt(body[:12], body[12:], _PII_AAD + aad))
        except (InvalidTag, ValueError) as exc:
            raise SealedPiiError("sealed PII does not open (altered, or not its place)") from exc

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        return self._aead.decrypt(sealed[:12], sealed[12:], aad)

    def take(self, other: MasterKey) -> None:
        """Become ``other`` (a rotated key), for the components holding this object."""
        self._aead = other._aead
        self._pseudonym_key = other._pseudonym_key
        self.use_field_key(other._field_key_id, other._field_key)

    def __repr__(self) -> str:
        return "MasterKey(<redacted>)"


_PII_AAD = b"upi-engine:pii|"


class SealedPiiError(ValueError):
    """Sealed PII that does not open under this engine's field key."""


def _derived_key_id(key: bytes) -> str:
    return "fk_" + hashlib.sha256(b"upi-engine/field-key-id|" + key).hexdigest()[:10]


def _decode(value: str, variable: str) -> bytes:
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{variable}: not valid base64") from None
    if len(key) != 32:
        raise ConfigError(f"{variable}: must decode to 32 bytes (got {len(key)})")
    return key


def master_key_file(settings: Settings) -> Path | None:
    """The file the master key is read from (None: it is in ``UPI_MASTER_KEY``)."""
    if settings.master_key:
        return None
    if settings.master_key_file:
        return Path(settings.master_key_file)
    if not settings.embedded:
        return None
    return settings.data_dir.expanduser().resolve() / "master.key"


def write_key_file(path: Path) -> MasterKey:
    """A new random master key, written to ``path`` (mode 0600; it must not exist)."""
    key = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(key).decode() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return MasterKey(key)


def read_key_file(path: Path, what: str) -> MasterKey:
    try:
        _refuse_loose(path, what)
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read: {exc.strerror}") from None
    return MasterKey(_decode(text, what))


def load_master_key(settings: Settings, *, path: Path | None = None) -> MasterKey:
    """The configured master key; ``path``: read this key file instead."""
    if path is not None:
        return read_key_file(path, str(path))
    if settings.master_key:
        return MasterKey(_decode(settings.master_key, "UPI_MASTER_KEY"))
    if settings.master_key_file:
        return read_key_file(Path(settings.master_key_file), "UPI_MASTER_KEY_FILE")
    if not settings.embedded:
        raise ConfigError("UPI_MASTER_KEY: required when UPI_DATABASE_URL is set")
    path = settings.data_dir.expanduser().resolve() / "master.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it first
            write_key_file(path)
            _log.warning("generated a new master key at %s (mode 0600); back it up", path)
    return read_key_file(path, f"the master key file {path}")


def _refuse_loose(path: Path, what: str) -> None:
    """A key file others may read (or write) is refused, as ssh refuses a private key: the
    engine will not start on a key that may already be copied."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"{what}: mode {mode:04o} lets others read or change it; run chmod 600 {path}"
        )
