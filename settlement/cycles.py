"""NPCI's settlement cycles within a business date (SPEC §7), pure (no I/O).

From 3 November 2025, as reported (NPCI/UPI/OC No. 222/2025-26; Mint, 22 September 2025),
UPI settles in ten cycles a day that carry only authorised transactions, and two dispute
cycles, DC1 and DC2, that carry only dispute settlements (chargebacks and other
adjustments). :data:`NPCI_CYCLES` is that table; ``UPI_SETTLEMENT_CYCLES`` replaces it.

A cycle is named by its **cut-off**, an IST time of day. Cut-offs of each kind are listed
in increasing order; a cycle runs from the cut-off of the one before it to its own. The
first cycle of a kind starts at the last cut-off of that kind *of the previous day* unless
that cut-off is 24:00: NPCI's cycle 1 runs from 21:00 to midnight, its cut-off is 00:00.

**Placement.** An item belongs to the first cycle of its kind whose cut-off is after its
final-status time (a time exactly at a cut-off falls in the next cycle). The business date
is never moved by a cycle: it stays the IST calendar day of the final status (SPEC §7), so
a payment lands in exactly one date, and the cycles only group that date's items:

* an item after the day's last cut-off (21:00-24:00 with NPCI's table) would be in the
  first cycle of NPCI's next day; here it is in the first cycle of *its own* date;
* an item carried to a later date because its own date was already closed (its final
  status is before the date's first cycle) is in the first cycle of the date carrying it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from itertools import pairwise

from core.clock import IST

__all__ = [
    "NPCI_CYCLES",
    "Cycle",
    "CycleTable",
    "CycleTableError",
    "cycle_of",
    "dispute_cycle_of",
    "parse_cutoff",
]

_DAY_MINUTES = 24 * 60
_CUTOFF = re.compile(r"(?P<h>[0-9]{2}):(?P<m>[0-9]{2})")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


class CycleTableError(ValueError):
    """A cycle table that cannot group a day: the message says which cycle and why."""


def parse_cutoff(text: str) -> int:
    """``"HH:MM"`` (00:00 to 24:00) → minutes after IST midnight."""
    match = _CUTOFF.fullmatch(text)
    if match is None:
        raise CycleTableError(f"cut-off {text!r} is not HH:MM")
    hours, minutes = int(match["h"]), int(match["m"])
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise CycleTableError(f"cut-off {text!r} is not a time from 00:00 to 24:00")
    return hours * 60 + minutes


@dataclass(frozen=True)
class Cycle:
    name: str
    cutoff_minute: int  # minutes after IST midnight, 0 to 1440 (24:00)
    dispute: bool = False

    @property
    def cutoff(self) -> str:
        return f"{self.cutoff_minute // 60:02d}:{self.cutoff_minute % 60:02d}"


@dataclass(frozen=True)
class CycleTable:
    """The cycles of a day, in reporting order: settlement and dispute cycles, each kind
    with increasing cut-offs. Checked when built (:class:`CycleTableError`)."""

    cycles: tuple[Cycle, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for cycle in self.cycles:
            if not _NAME.fullmatch(cycle.name):
                raise CycleTableError(
                    f"cycle name {cycle.name!r}: use 1 to 32 letters, digits, '-' or '_'"
                )
            if cycle.name in seen:
                raise CycleTableError(f"cycle name {cycle.name!r} is listed twice")
            seen.add(cycle.name)
            if not 0 <= cycle.cutoff_minute <= _DAY_MINUTES:
                raise CycleTableError(f"cycle {cycle.name!r}: cut-off outside 00:00-24:00")
        for dispute, kind in ((False, "settlement"), (True, "dispute")):
            of_kind = [c for c in self.cycles if c.dispute is dispute]
            if not of_kind:
                raise CycleTableError(f"the table has no {kind} cycle")
            for before, after in pairwise(of_kind):
                if after.cutoff_minute <= before.cutoff_minute:
                    raise CycleTableError(
                        f"{kind} cycle {after.name!r} ({after.cutoff}) must end after"
                        f" {before.name!r} ({before.cutoff}): list cut-offs in increasing order"
                    )
            first, last = of_kind[0], of_kind[-1]
            if len(of_kind) > 1 and last.cutoff_minute - first.cutoff_minute == _DAY_MINUTES:
                raise CycleTableError(
                    f"{kind} cycle {first.name!r} would be empty: its cut-off 00:00 is the"
                    f" same midnight as {last.name!r}'s 24:00"
                )

    @classmethod
    def from_entries(cls, entries: Iterable[Mapping[str, object]]) -> CycleTable:
        """From ``[{"name": "C1", "cutoff": "00:00", "dispute": false}, ...]``."""
        cycles = []
        for number, entry in enumerate(entries, start=1):
            unknown = sorted(set(entry) - {"name", "cutoff", "dispute"})
            if unknown:
                raise CycleTableError(f"cycle #{number}: unknown key {unknown[0]!r}")
            name, cutoff, dispute = entry.get("name"), entry.get("cutoff"), entry.get("dispute")
            if not isinstance(name, str):
                raise CycleTableError(f'cycle #{number}: needs a "name" (a string)')
            if not isinstance(cutoff, str):
                raise CycleTableError(f'cycle {name!r}: needs a "cutoff" (a string HH:MM)')
            if not isinstance(dispute, bool | None):
                raise CycleTableError(f'cycle {name!r}: "dispute" must be true or false')
            try:
                minute = parse_cutoff(cutoff)
            except CycleTableError as exc:
                raise CycleTableError(f"cycle {name!r}: {exc}") from None
            cycles.append(Cycle(name, minute, bool(dispute)))
        return cls(tuple(cycles))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cycles)

    def settlement_cycle(self, at: datetime, business_date: date | None = None) -> str:
        """The settlement cycle of an item whose final status was at ``at``, within
        ``business_date`` (the date settling it; default: the IST day of ``at``)."""
        return self._place(at, business_date, dispute=False).name

    def dispute_cycle(self, at: datetime, business_date: date | None = None) -> str:
        """The dispute cycle (DC1, DC2 with NPCI's table) of a dispute adjustment — a
        chargeback accepted or lost at ``at`` — within ``business_date``."""
        return self._place(at, business_date, dispute=True).name

    def _place(self, at: datetime, business_date: date | None, *, dispute: bool) -> Cycle:
        if at.tzinfo is None:
            raise ValueError("a final-status time must carry its time zone")
        local = at.astimezone(IST)
        of_kind = [c for c in self.cycles if c.dispute is dispute]
        if business_date is not None and local.date() < business_date:
            return of_kind[0]  # carried from a closed date: the date's first cycle
        since_midnight = local - local.replace(hour=0, minute=0, second=0, microsecond=0)
        for cycle in of_kind:
            if timedelta(minutes=cycle.cutoff_minute) > since_midnight:
                return cycle
        # After the day's last cut-off: the next cut-off on the clock is the first
        # cycle's, tomorrow. The date stays the IST day; the item is in its first cycle.
        return of_kind[0]


# NPCI's table from 3 November 2025, as reported: cycles 1-10 (authorised transactions)
# and the dispute cycles DC1 (00:00-16:00) and DC2 (16:00-24:00). Cycle 1 runs 21:00 of the
# previous day to midnight; cycle 2 midnight to 05:00; then two-hour cycles to 21:00.
NPCI_CYCLES = CycleTable(
    (
        Cycle("C1", 0),
        Cycle("C2", 5 * 60),
        Cycle("C3", 7 * 60),
        Cycle("C4", 9 * 60),
        Cycle("C5", 11 * 60),
        Cycle("C6", 13 * 60),
        Cycle("C7", 15 * 60),
        Cycle("C8", 17 * 60),
        Cycle("C9", 19 * 60),
        Cycle("C10", 21 * 60),
        Cycle("DC1", 16 * 60, dispute=True),
        Cycle("DC2", 24 * 60, dispute=True),
    )
)


def cycle_of(
    at: datetime, table: CycleTable = NPCI_CYCLES, *, business_date: date | None = None
) -> str:
    """The settlement cycle of an item final at ``at`` (see the module docstring)."""
    return table.settlement_cycle(at, business_date)


def dispute_cycle_of(
    at: datetime, table: CycleTable = NPCI_CYCLES, *, business_date: date | None = None
) -> str:
    """The dispute cycle of a chargeback (or other dispute adjustment) resolved at ``at``:
    DC1 before 16:00 IST, DC2 from 16:00, with NPCI's table. ``business_date``: the date
    that settles it, when that is later than the IST day of ``at`` (its own date was
    closed): then it is that date's first dispute cycle."""
    return table.dispute_cycle(at, business_date)
