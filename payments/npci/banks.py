"""PSP handles → banks (SPEC §5)."""

from __future__ import annotations

__all__ = ["HANDLES", "bank_of"]

HANDLES: dict[str, str] = {
    "okhdfc": "HDFC",
    "okhdfcbank": "HDFC",
    "hdfcbank": "HDFC",
    "okicici": "ICICI",
    "icici": "ICICI",
    "oksbi": "SBI",
    "sbi": "SBI",
    "okaxis": "AXIS",
    "axisbank": "AXIS",
    "ybl": "YES",
    "yesbank": "YES",
    "paytm": "PYTM",
    "ptyes": "YES",
    "ibl": "ICICI",
    "upi": "NPCI",
    "kotak": "KOTAK",
    "pnb": "PNB",
    "barodampay": "BOB",
}


def bank_of(vpa: str) -> str | None:
    handle = vpa.rsplit("@", 1)[-1].lower()
    return HANDLES.get(handle)
