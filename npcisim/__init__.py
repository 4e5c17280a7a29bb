"""The NPCI switch simulator: the outside world the engine talks to (SPEC §5).

It stands where NPCI and the banks behind it would: accounts and balances, the switch's
journal, NPCI's API rules, the dispute desk (UDIR) and the switch's settlement data. The
engine reaches it only through the switch port (:class:`payments.npci.switch.SwitchClient`
and :class:`payments.npci.switch.SettlementData`), in process or over HTTP
(``upi-engine npci-mock``); only the composition root (``api``) builds it, and nothing of
the engine imports it (an import-linter contract).

Its tables are its own, in the PostgreSQL schema ``npci_sim`` (:mod:`npcisim.migrations`),
created only where it runs. With a real NPCI in its place none of them exists.

- :mod:`npcisim.mock`     — the switch (:class:`~npcisim.mock.MockSwitch`).
- :mod:`npcisim.disputes` — its dispute desk.
- :mod:`npcisim.http`     — its HTTP app (``upi-engine npci-mock``).
"""
