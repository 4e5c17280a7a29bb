"""Talking to the NPCI switch: the port, the response-code table, and the mock switch.

- :mod:`payments.npci.codes`   — UPI response codes and what each means for a payment.
- :mod:`payments.npci.banks`   — PSP handle → bank registry.
- :mod:`payments.npci.switch`  — the port (:class:`SwitchClient`) and its request/result types.
- :mod:`payments.npci.mock`    — the mock switch (the only mock in the product, on purpose).
"""
