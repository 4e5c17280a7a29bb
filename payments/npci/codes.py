"""UPI response codes (NPCI's published table) and their meaning for a payment.

This is the one place that maps switch codes to outcomes; the mapping is exhaustive over
:class:`Outcome` and the NPCI handler matches on it with ``assert_never``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["BANK_UNAVAILABLE", "CODES", "Outcome", "ResponseCode", "describe", "outcome_of"]


class Outcome(StrEnum):
    SUCCESS = "SUCCESS"  # debited and credited
    FAILED = "FAILED"  # nothing moved; final
    DEEMED = "DEEMED"  # no definite answer: ask check-status later, never resubmit
    PENDING = "PENDING"  # switch still working on it


@dataclass(frozen=True)
class ResponseCode:
    code: str
    outcome: Outcome
    description: str


_TABLE = [
    ResponseCode("00", Outcome.SUCCESS, "Approved or completed successfully"),
    ResponseCode("01", Outcome.PENDING, "Transaction pending"),
    ResponseCode("RB", Outcome.DEEMED, "Deemed: response not received within the timeout"),
    ResponseCode("BT", Outcome.DEEMED, "Acquirer/beneficiary unavailable, deemed"),
    ResponseCode("Z9", Outcome.FAILED, "Insufficient funds in customer (remitter) account"),
    ResponseCode("ZM", Outcome.FAILED, "Invalid MPIN"),
    ResponseCode("Z6", Outcome.FAILED, "Number of PIN tries exceeded"),
    ResponseCode("Z8", Outcome.FAILED, "Per transaction limit exceeded as set by remitting member"),
    ResponseCode("Z7", Outcome.FAILED, "Transaction frequency limit exceeded"),
    ResponseCode("ZA", Outcome.FAILED, "Transaction declined by customer"),
    ResponseCode("U16", Outcome.FAILED, "Risk threshold exceeded"),
    ResponseCode("59", Outcome.FAILED, "Suspected fraud, decline / transactions declined"),
    ResponseCode("U30", Outcome.FAILED, "Debit has failed"),
    ResponseCode("U09", Outcome.DEEMED, "ReqAuth time-out for PAY"),
    ResponseCode("U68", Outcome.DEEMED, "Credit time-out"),
    ResponseCode("XY", Outcome.FAILED, "Remitter bank (CBS) offline"),
    ResponseCode("ZE", Outcome.FAILED, "Transaction not permitted to VPA by the PSP"),
    ResponseCode("ZH", Outcome.FAILED, "Invalid virtual address"),
    ResponseCode("B3", Outcome.FAILED, "Transaction not permitted to the account"),
    ResponseCode("U28", Outcome.FAILED, "PSP not available (switch refused the request)"),
    ResponseCode("U90", Outcome.FAILED, "Remitter bank deemed high response time check decline"),
    ResponseCode("U91", Outcome.FAILED, "Beneficiary bank deemed high response time check decline"),
    ResponseCode("U69", Outcome.FAILED, "Collect request expired: not verified in time"),
    # Reversal outcomes. A reversal that returned the debit answers 00.
    ResponseCode("21", Outcome.FAILED, "Reversal: no action taken, original was not debited"),
    ResponseCode("32", Outcome.FAILED, "Reversal: partial reversal"),
    ResponseCode("96", Outcome.DEEMED, "Reversal failure / system malfunction, retry"),
]

CODES: dict[str, ResponseCode] = {rc.code: rc for rc in _TABLE}

# Answers that say the bank itself is unwell (they count against its circuit breaker);
# ordinary declines such as Z9 or ZM do not.
BANK_UNAVAILABLE = frozenset({"XY", "U28", "U90", "U91"})


def outcome_of(code: str) -> Outcome:
    """Unknown codes are treated as DEEMED: we do not know whether money moved."""
    rc = CODES.get(code)
    return rc.outcome if rc else Outcome.DEEMED


def describe(code: str) -> str:
    rc = CODES.get(code)
    return rc.description if rc else f"Unknown response code {code}"
