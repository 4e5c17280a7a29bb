"""Settlement context: T+1 inter-bank and merchant settlement with reconciliation.

``domain`` (the math, pure), ``holidays`` (working days), ``recorder`` (events → items),
``journal`` (the switch's journal, the one outside source), ``run`` (closing a date).
"""
