"""Bank working days: Sundays, the second and fourth Saturdays, and bank holidays are not.

The 2026 list below holds the holidays that close banks across India (RBI's national
list under the Negotiable Instruments Act). Regional holidays differ by state; dates of the
lunar festivals follow the published 2026 calendars. Operators can replace the list with
``UPI_SETTLEMENT_HOLIDAYS_FILE`` (a JSON array of ``"YYYY-MM-DD"``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import date, timedelta
from pathlib import Path

__all__ = ["BANK_HOLIDAYS_2026", "HolidayCalendar"]

BANK_HOLIDAYS_2026: dict[str, str] = {
    "2026-01-26": "Republic Day",
    "2026-03-04": "Holi",
    "2026-03-21": "Id-ul-Fitr (Ramzan Id)",
    "2026-03-31": "Mahavir Jayanti",
    "2026-04-03": "Good Friday",
    "2026-04-14": "Dr. B. R. Ambedkar Jayanti",
    "2026-05-01": "Buddha Purnima / Maharashtra Day",
    "2026-05-27": "Bakri Id (Id-ul-Zuha)",
    "2026-06-26": "Muharram",
    "2026-08-15": "Independence Day",
    "2026-08-26": "Milad-un-Nabi",
    "2026-09-04": "Janmashtami",
    "2026-10-02": "Mahatma Gandhi Jayanti",
    "2026-10-20": "Dussehra (Vijaya Dashami)",
    "2026-11-09": "Diwali (Balipratipada)",
    "2026-11-24": "Guru Nanak Jayanti",
    "2026-12-25": "Christmas",
}


class HolidayCalendar:
    def __init__(self, holidays: Iterable[date]) -> None:
        self._holidays = frozenset(holidays)

    @classmethod
    def default(cls) -> HolidayCalendar:
        return cls(date.fromisoformat(d) for d in BANK_HOLIDAYS_2026)

    @classmethod
    def from_file(cls, path: Path) -> HolidayCalendar:
        return cls(date.fromisoformat(d) for d in json.loads(path.read_text()))

    def is_working_day(self, day: date) -> bool:
        if day.weekday() == 6 or day in self._holidays:
            return False
        if day.weekday() == 5:
            nth = (day.day - 1) // 7 + 1
            return nth not in (2, 4)
        return True

    def next_working_day(self, day: date) -> date:
        """The first working day strictly after ``day`` (T+1 settlement date)."""
        candidate = day + timedelta(days=1)
        while not self.is_working_day(candidate):
            candidate += timedelta(days=1)
        return candidate
