"""Settlement context: T+1 inter-bank and merchant settlement with reconciliation.

``domain`` (the math, pure), ``cycles`` (NPCI's cycles of a day, pure), ``holidays``
(working days), ``recorder`` (events → items), ``journal`` (the switch's journal, the one
outside source), ``run`` (closing a date).
"""
