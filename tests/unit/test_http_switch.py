"""The HTTP switch client maps wire failures onto the port's contract."""

import httpx
import pytest

from core.errors import SwitchError, SwitchTimeout
from payments.npci.http import HttpSwitch
from payments.npci.switch import PayRequest

REQUEST = PayRequest("UPI1", "success@okhdfc", "shop@okicici", 100)


def switch(handler) -> HttpSwitch:
    return HttpSwitch("http://switch", transport=httpx.MockTransport(handler))


async def test_an_answer_is_decoded():
    def ok(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/pay"
        return httpx.Response(
            200,
            json={
                "txn_id": "UPI1",
                "response_code": "00",
                "rrn": "1" * 12,
                "payer_bank": "HDFC",
                "payee_bank": "ICICI",
                "known": True,
            },
        )

    result = await switch(ok).pay(REQUEST)
    assert (result.response_code, result.payer_bank) == ("00", "HDFC")


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (lambda r: httpx.Response(503, text="busy"), SwitchError),  # refused, not processed
        (lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)), SwitchError),
        (lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=r)), SwitchTimeout),
        (
            lambda r: (_ for _ in ()).throw(httpx.RemoteProtocolError("gone", request=r)),
            SwitchTimeout,
        ),
        (lambda r: httpx.Response(500), SwitchTimeout),  # it may have processed it
    ],
)
async def test_failures_say_whether_the_request_may_have_been_processed(failure, expected):
    with pytest.raises(expected):
        await switch(failure).pay(REQUEST)
