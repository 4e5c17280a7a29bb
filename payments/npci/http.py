"""The engine's client of the switch port over HTTP, used when ``UPI_NPCI_URL`` is set (the
simulator behind ``upi-engine npci-mock``, :mod:`npcisim.http`, or a switch speaking the same).

Errors on the wire map onto the port's contract: a 503 or a refused connection means the
request was not processed (:class:`~core.errors.SwitchError`, safe to ask check-status and
resend); a read timeout or a dropped connection means we do not know
(:class:`~core.errors.SwitchTimeout`: the payment is deemed, never resent); a 429 is a call
refused under NPCI's API rules (:class:`~core.errors.SwitchRateLimited`, nothing done).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

import httpx

from core.errors import SwitchError, SwitchRateLimited, SwitchTimeout
from payments.npci.switch import (
    DisputeNotice,
    PayRequest,
    RefundRequest,
    ReversalResult,
    SettlementRecord,
    SwitchResult,
)

__all__ = ["HttpSwitch"]


def _notice(d: dict[str, Any]) -> DisputeNotice:
    at = datetime.fromisoformat
    return DisputeNotice(
        dispute_id=d["dispute_id"],
        txn_id=d["txn_id"],
        amount_paise=int(d["amount_paise"]),
        reason=d["reason"],
        raised_at=at(d["raised_at"]),
        respond_by=at(d["respond_by"]),
        status=d["status"],
        changed_at=at(d["changed_at"]),
        payer_bank=d["payer_bank"],
        payee_bank=d["payee_bank"],
        decided_at=at(d["decided_at"]) if d.get("decided_at") else None,
    )


class HttpSwitch:
    """The switch port over HTTP. Timeouts are the caller's (the NPCI leg timeouts)."""

    def __init__(self, base_url: str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(None, connect=5.0),
            transport=transport,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = await self._client.request(method, path, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise SwitchError(f"switch unreachable: {exc!r}") from exc
        except httpx.HTTPError as exc:  # sent, then lost: we cannot know what happened
            raise SwitchTimeout(f"no answer from the switch: {exc!r}") from exc
        if response.status_code == 503:
            raise SwitchError(f"switch refused: {response.text[:200]}")
        if response.status_code == 429:
            refused = response.json()
            raise SwitchRateLimited(
                str(refused.get("api", path)),
                str(refused.get("reason", "rate limited")),
                refused.get("retry_after_s"),
            )
        if response.status_code >= 500:
            raise SwitchTimeout(f"switch failed with {response.status_code}")
        if response.status_code >= 400:
            raise SwitchError(f"switch rejected the request: {response.status_code}")
        return response.json()

    async def pay(self, request: PayRequest) -> SwitchResult:
        return SwitchResult(**await self._call("POST", "/v1/pay", request.__dict__))

    async def check_status(self, txn_id: str) -> SwitchResult:
        return SwitchResult(**await self._call("GET", f"/v1/transactions/{txn_id}"))

    async def reverse(self, txn_id: str) -> ReversalResult:
        return ReversalResult(**await self._call("POST", f"/v1/transactions/{txn_id}/reversal"))

    async def refund(self, request: RefundRequest) -> SwitchResult:
        return SwitchResult(**await self._call("POST", "/v1/refunds", request.__dict__))

    async def dispute_updates(self, since: datetime, limit: int = 500) -> list[DisputeNotice]:
        try:
            response = await self._client.get(
                "/v1/disputes", params={"since": since.isoformat(), "limit": limit}
            )
        except httpx.HTTPError as exc:
            raise SwitchError(f"switch unreachable: {exc!r}") from exc
        if response.status_code != 200:
            raise SwitchError(f"dispute feed answered {response.status_code}")
        return [_notice(d) for d in response.json()["disputes"]]

    async def answer_dispute(
        self,
        dispute_id: str,
        *,
        accept: bool,
        evidence: str | None = None,
        documents: Sequence[str] = (),
    ) -> DisputeNotice:
        body = {"accept": accept, "evidence": evidence, "documents": list(documents)}
        return _notice(await self._call("POST", f"/v1/disputes/{dispute_id}/answer", body))

    async def raise_dispute(self, txn_id: str, reason: str = "goods_not_received") -> DisputeNotice:
        return _notice(
            await self._call("POST", f"/v1/transactions/{txn_id}/disputes", {"reason": reason})
        )

    async def settlement_data(
        self, business_date: date, references: Sequence[str]
    ) -> list[SettlementRecord]:
        body = {"business_date": business_date.isoformat(), "refs": list(references)}
        found = await self._call("POST", "/v1/settlement-data", body)
        return [SettlementRecord(**r) for r in found["rows"]]

    async def close(self) -> None:
        await self._client.aclose()
