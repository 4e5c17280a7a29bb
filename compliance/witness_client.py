"""``upi-engine ledger witness``: an independent witness of the ledger (SPEC §3, §6).

Run by someone other than the engine's operator, with an auditor token. Each round it
fetches the newest signed checkpoint, checks its signature against the log keys it pinned
at first use, and checks the log's consistency proof from the last checkpoint it accepted
(its state file). If all holds it moves its state on and cosigns the checkpoint with its
own Ed25519 key; the engine stores and exports the cosignature. A rollback (an older
checkpoint than the one accepted), a fork (another checkpoint of the same height, or one
that is not consistent with it) or a bad signature is refused: the state stays, the
evidence (both signed checkpoints) is written beside the state file, and the witness
exits 1 after one clear line, so that whoever runs it is alerted.

The decision itself is :func:`compliance.verifier.witness_verdict` (pure, and in the file
an auditor can copy alone).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compliance.chain import cosign
from compliance.verifier import (
    Checkpoint,
    WitnessState,
    load_public_key,
    witness_key_id,
    witness_verdict,
)

__all__ = [
    "WitnessAlarm",
    "WitnessError",
    "WitnessRound",
    "load_or_create_key",
    "run_witness",
    "state_path_for",
    "witness_round",
]

_log = logging.getLogger("upi.ledger.witness")


class WitnessAlarm(Exception):
    """The log misbehaved (rollback, fork, bad signature); the message says how."""


class WitnessError(Exception):
    """The witness cannot do its round (not registered, bad token, engine unreachable)."""


@dataclass(frozen=True)
class WitnessRound:
    height: int
    decision: str  # accept | same
    cosigned: bool  # a cosignature was posted this round
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "decision": self.decision,
            "cosigned": self.cosigned,
            "reason": self.reason,
        }


def state_path_for(key_file: Path) -> Path:
    return key_file.with_name(key_file.name + ".state.json")


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def load_or_create_key(key_file: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The witness's private key (PEM, mode 0600), made at first use; its public key is
    written beside it as ``KEY_FILE.pub`` for the engine's operator and for auditors."""
    if key_file.exists():
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise WitnessError(f"{key_file} is not an Ed25519 private key")
        return key, False
    key = Ed25519PrivateKey.generate()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    _write_private(
        key_file,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    public_file(key_file).write_bytes(_public_pem(key.public_key()))
    return key, True


def public_file(key_file: Path) -> Path:
    return key_file.with_name(key_file.name + ".pub")


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class _State:
    accepted: WitnessState | None
    log_keys: list[str]  # PEMs pinned at first use

    @classmethod
    def load(cls, path: Path) -> _State:
        if not path.exists():
            return cls(None, [])
        data = json.loads(path.read_text())
        accepted = data.get("accepted")
        return cls(
            WitnessState.from_json(accepted) if accepted else None, list(data.get("log_keys", []))
        )

    def save(self, path: Path) -> None:
        body = {
            "accepted": self.accepted.to_json() if self.accepted else None,
            "log_keys": self.log_keys,
        }
        _write_private(path, json.dumps(body, indent=2).encode())


async def _get(client: httpx.AsyncClient, path: str, **params: Any) -> Any:
    response = await client.get(path, params=params or None)
    if response.status_code in (401, 403):
        raise WitnessError(f"GET {path}: {response.status_code}: the token is not an auditor's")
    response.raise_for_status()
    return response.json()


async def witness_round(
    client: httpx.AsyncClient,
    key: Ed25519PrivateKey,
    state_file: Path,
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> WitnessRound:
    """One round: fetch, check, cosign. Raises :class:`WitnessAlarm` on misbehaviour."""
    state = _State.load(state_file)
    if not state.log_keys:
        pems = await _get(client, "/v1/audit/public-keys")
        state.log_keys = sorted(pems.values())
    log_keys = [load_public_key(p.encode()) for p in state.log_keys]
    latest = await _get(client, "/v1/audit/checkpoints/latest")
    checkpoint = Checkpoint.from_export(latest)
    proof = None
    if state.accepted is not None and checkpoint.height > state.accepted.height:
        found = await _get(
            client, "/v1/audit/consistency", first=state.accepted.height, second=checkpoint.height
        )
        proof = [bytes.fromhex(h) for h in found["proof"]]
    verdict = witness_verdict(state.accepted, checkpoint, log_keys, proof)
    if verdict.alarming:
        evidence = state_file.with_name(state_file.name + ".alarm.json")
        evidence.write_text(
            json.dumps(
                {
                    "decision": verdict.decision,
                    "reason": verdict.reason,
                    "accepted": state.accepted.to_json() if state.accepted else None,
                    "shown": latest,
                    "consistency_proof": [h.hex() for h in proof] if proof is not None else None,
                    "seen_at": now().isoformat(),
                },
                indent=2,
            )
        )
        raise WitnessAlarm(f"{verdict.reason}; evidence in {evidence}")
    if verdict.accepted:
        state.accepted = WitnessState(
            checkpoint.height, checkpoint.head_hash, checkpoint.merkle_root
        )
    state.save(state_file)  # before cosigning: a crash never cosigns what it did not keep
    my_id = witness_key_id(key.public_key())
    cosigned = False
    if my_id not in {c["witness_key_id"] for c in latest.get("cosignatures", [])}:
        at = now().isoformat(timespec="microseconds").replace("+00:00", "Z")
        cosignature = cosign(key, checkpoint, witness_key_id_=my_id, cosigned_at=at)
        response = await client.post("/v1/audit/cosignatures", json=_body(cosignature.to_export()))
        if response.status_code == 403:
            raise WitnessError(
                f"the engine does not know witness {my_id}: its operator registers it with"
                " `upi-engine ledger add-witness --name NAME --public-key KEY_FILE.pub`"
            )
        response.raise_for_status()
        cosigned = True
    return WitnessRound(checkpoint.height, verdict.decision, cosigned, verdict.reason)


def _body(line: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in line.items() if k != "type"}


async def run_witness(
    url: str,
    token: str,
    key_file: Path,
    state_file: Path,
    *,
    once: bool,
    interval_s: float,
    on_round: Callable[[WitnessRound], None],
    stopping: asyncio.Event | None = None,
) -> None:
    """Rounds every ``interval_s`` until ``stopping`` (or one, with ``once``). An engine that
    cannot be reached is retried next round; an alarm ends the run (raised)."""
    key, _ = load_or_create_key(key_file)
    stop = stopping or asyncio.Event()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
        while True:
            try:
                on_round(await witness_round(client, key, state_file))
            except (httpx.HTTPError, OSError) as exc:
                if once:
                    raise WitnessError(f"cannot reach the engine at {url}: {exc}") from exc
                _log.warning("witness round failed; trying again", extra={"error": str(exc)})
            if once:
                return
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
                return
            except TimeoutError:
                continue
