"""PII wrappers that mask themselves (SPEC §1: ``ra***ar@okhdfc``).

``str()``/``repr()`` of a :class:`Vpa` is masked, so a VPA that slips into a log line or an
exception message does not leak; ``.value`` is the clear text, used on purpose only.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

__all__ = ["VPA_PATTERN", "Vpa", "mask_text", "mask_vpa", "unkeyed_partition_key"]

# NPCI: local part of letters, digits, '.', '-', '_' ; handle of letters (and digits).
VPA_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}@[A-Za-z][A-Za-z0-9]{1,63}$")
# Not preceded by a VPA character or "*": an already masked VPA is left as it is.
_VPA_IN_TEXT = re.compile(
    r"(?<![A-Za-z0-9._*-])[A-Za-z0-9][A-Za-z0-9._-]{0,254}@[A-Za-z][A-Za-z0-9]{1,63}"
)


def mask_vpa(vpa: str) -> str:
    local, _, handle = vpa.partition("@")
    if len(local) <= 4:
        shown = local[:1] + "***"
    else:
        shown = f"{local[:2]}***{local[-2:]}"
    return f"{shown}@{handle}" if handle else shown


def mask_text(text: str) -> str:
    """Mask every VPA-looking substring of free text (log messages)."""
    return _VPA_IN_TEXT.sub(lambda m: mask_vpa(m.group(0)), text)


def unkeyed_partition_key(vpa: str) -> str:
    """The bus partition key of payments made before migration ``payments.0016``: an unkeyed
    hash, which anyone holding a list of VPAs can reverse. New payments take a keyed one
    (:meth:`core.crypto.MasterKey.partition_key`); a payment keeps its key for life, so one
    payer's events stay in order across the upgrade. For tests that need a stable key."""
    return hashlib.sha256(vpa.lower().encode()).hexdigest()[:32]


class Vpa(str):
    """A UPI address. Compares and hashes as its (lower-cased) text; prints masked."""

    __slots__ = ()

    def __new__(cls, value: str) -> Vpa:
        if not VPA_PATTERN.match(value):
            raise ValueError("not a valid VPA (local-part@handle)")
        return super().__new__(cls, value.lower())

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def handle(self) -> str:
        return self.value.rsplit("@", 1)[1]

    @property
    def local(self) -> str:
        return self.value.rsplit("@", 1)[0]

    @property
    def masked(self) -> str:
        return mask_vpa(self.value)

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"Vpa({self.masked!r})"

    def __format__(self, spec: str) -> str:
        return format(self.masked, spec)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            cls,
            core_schema.str_schema(max_length=255, pattern=VPA_PATTERN.pattern),
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda v: str.__str__(v), when_used="always"
            ),
        )
