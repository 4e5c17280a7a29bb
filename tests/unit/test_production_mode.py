"""``UPI_ENV`` (SPEC §1): its settings, what production refuses, and the step-up
provider port's two adapters (the mock OTP, and the HTTP provider against httpx's
MockTransport)."""

from __future__ import annotations

import json

import httpx
import pytest

from api.bootstrap import Role, _expand, production_problem, verification_provider
from core.config import Environment, load_settings
from core.errors import ConfigError
from payments.verification import (
    HttpVerificationProvider,
    MockOtpProvider,
    VerificationUnavailable,
)

ALL = _expand([Role.ALL])


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("UPI_ENV", "UPI_INTERNAL_PORT", "UPI_NPCI_URL", "UPI_VERIFICATION_URL"):
        monkeypatch.delenv(var, raising=False)


def test_the_sandbox_is_the_default():
    s = load_settings()
    assert s.env is Environment.SANDBOX and not s.production
    assert s.internal_port is None and s.internal_host == "127.0.0.1"
    assert load_settings(env="PRODUCTION").production


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("UPI_ENV", "staging"),
        ("UPI_ENV", "prod"),
        ("UPI_INTERNAL_PORT", "0"),
        ("UPI_INTERNAL_PORT", "70000"),
        ("UPI_INTERNAL_PORT", "metrics"),
        ("UPI_VERIFICATION_URL", "ftp://otp.example"),
        ("UPI_VERIFICATION_TIMEOUT_S", "0"),
    ],
)
def test_a_bad_value_names_the_variable_in_one_line(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(f"{var}:") and "\n" not in message


def test_the_provider_token_is_never_shown(monkeypatch):
    monkeypatch.setenv("UPI_VERIFICATION_TOKEN", "s3cr3t-token")
    monkeypatch.setenv("UPI_VERIFICATION_TIMEOUT_S", "-1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "s3cr3t" not in str(info.value)


def test_the_sandbox_allows_both_mocks():
    assert production_problem(load_settings(), ALL) is None


def test_production_refuses_the_in_process_mock_switch():
    s = load_settings(env="production", verification_url="https://otp.example")
    problem = production_problem(s, ALL)
    assert problem is not None and problem.startswith("UPI_NPCI_URL:")
    # A switch client given by the caller is not the in-process mock; no switch role, no switch.
    assert production_problem(s, ALL, switch_given=True) is None
    assert production_problem(s, frozenset({Role.GATEWAY})) is None


def test_production_refuses_the_mock_otp():
    s = load_settings(env="production", npci_url="https://switch.example")
    for roles in (ALL, frozenset({Role.GATEWAY}), frozenset({Role.SWITCH})):
        problem = production_problem(s, roles)
        assert problem is not None and problem.startswith("UPI_VERIFICATION_URL:"), roles
    assert production_problem(s, frozenset({Role.FRAUD, Role.LEDGER})) is None
    ready = load_settings(
        env="production", npci_url="https://switch.example", verification_url="https://otp.x"
    )
    assert production_problem(ready, ALL) is None


def test_the_provider_follows_the_settings():
    assert isinstance(verification_provider(load_settings()), MockOtpProvider)
    assert isinstance(
        verification_provider(load_settings(verification_url="https://otp.example")),
        HttpVerificationProvider,
    )


async def test_the_mock_otp_accepts_its_one_code_only():
    mock = MockOtpProvider("123456")
    await mock.start("UPI1", "a@okhdfc")  # nothing to send
    assert await mock.check("UPI1", "123456")
    assert not await mock.check("UPI1", "654321")
    assert not await mock.check("UPI1", "1234567")


def _provider(handler, **kwargs) -> HttpVerificationProvider:
    return HttpVerificationProvider(
        "https://otp.example/v1/", transport=httpx.MockTransport(handler), **kwargs
    )


async def test_the_http_provider_posts_the_code_and_takes_the_verdict():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/challenges":
            return httpx.Response(202)
        body = json.loads(request.content)
        return httpx.Response(200, json={"verified": body["code"] == "975310"})

    provider = _provider(handler, token="tok_1")
    await provider.start("UPI1", "ravi@okhdfc")
    assert await provider.check("UPI1", "975310") is True
    assert await provider.check("UPI1", "000000") is False
    await provider.close()
    assert [(r.method, r.url.path) for r in seen] == [
        ("POST", "/v1/challenges"),
        ("POST", "/v1/checks"),
        ("POST", "/v1/checks"),
    ]
    assert json.loads(seen[0].content) == {"transaction_id": "UPI1", "payer_vpa": "ravi@okhdfc"}
    assert json.loads(seen[1].content) == {"transaction_id": "UPI1", "code": "975310"}
    assert all(r.headers["Authorization"] == "Bearer tok_1" for r in seen)


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(500, json={"verified": True}),
        httpx.Response(404),
        httpx.Response(200, text="yes"),
        httpx.Response(200, json={"verified": "true"}),
        httpx.Response(200, json=["verified"]),
        httpx.Response(200, json={}),
    ],
)
async def test_anything_but_a_verdict_is_no_verdict(answer):
    provider = _provider(lambda request: answer)
    with pytest.raises(VerificationUnavailable):
        await provider.check("UPI1", "123456")
    await provider.close()


@pytest.mark.parametrize("error", [httpx.ReadTimeout, httpx.ConnectError, httpx.ConnectTimeout])
async def test_a_timeout_or_a_lost_connection_is_no_verdict(error):
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("no answer", request=request)

    provider = _provider(handler)
    with pytest.raises(VerificationUnavailable):
        await provider.check("UPI1", "123456")
    with pytest.raises(VerificationUnavailable):
        await provider.start("UPI1", "ravi@okhdfc")
    await provider.close()


async def test_a_refused_challenge_is_reported():
    provider = _provider(lambda request: httpx.Response(503))
    with pytest.raises(VerificationUnavailable):
        await provider.start("UPI1", "ravi@okhdfc")
    await provider.close()
