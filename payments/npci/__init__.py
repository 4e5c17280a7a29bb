"""Talking to the NPCI switch: the port, the response-code table, and the mock switch.

- :mod:`payments.npci.codes`   — UPI response codes and what each means for a payment.
- :mod:`payments.npci.banks`   — PSP handle → bank registry.
- :mod:`payments.npci.switch`  — the port (:class:`SwitchClient`) and its request/result types.
- :mod:`payments.npci.http`    — the port over HTTP (``UPI_NPCI_URL``).

The mock switch that stands in for NPCI is not here: it is the outside world, the
:mod:`npcisim` package, and nothing of the engine imports it.
"""
