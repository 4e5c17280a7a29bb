"""Payments context: the payment lifecycle (``domain``), the gateway use cases (``service``),
the NPCI handler (``npci_handler``) and the mock switch (``npci``)."""
