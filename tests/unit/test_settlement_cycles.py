"""NPCI's cycles within a business date: placement at every cut-off edge, and the table's
checks (settlement/cycles.py)."""

from datetime import UTC, date, datetime, timedelta

import pytest

from core.clock import IST
from settlement.cycles import (
    NPCI_CYCLES,
    Cycle,
    CycleTable,
    CycleTableError,
    cycle_of,
    dispute_cycle_of,
    parse_cutoff,
)

DAY = date(2026, 3, 2)
TICK = timedelta(microseconds=1)


def ist(hh: int, mm: int = 0, day: date = DAY) -> datetime:
    return datetime(day.year, day.month, day.day, hh, mm, tzinfo=IST)


def test_npcis_table_is_ten_settlement_cycles_then_dc1_and_dc2():
    assert NPCI_CYCLES.names == (*(f"C{n}" for n in range(1, 11)), "DC1", "DC2")
    assert [c.cutoff for c in NPCI_CYCLES.cycles] == [
        "00:00",
        "05:00",
        "07:00",
        "09:00",
        "11:00",
        "13:00",
        "15:00",
        "17:00",
        "19:00",
        "21:00",
        "16:00",
        "24:00",
    ]
    assert [c.name for c in NPCI_CYCLES.cycles if c.dispute] == ["DC1", "DC2"]


# (IST time of the final status, cycle). A time exactly at a cut-off is in the next cycle.
EDGES = [
    ((0, 0), "C2"),  # midnight: cycle 1's cut-off, so the first instant of cycle 2
    ((4, 59), "C2"),
    ((5, 0), "C3"),
    ((6, 59), "C3"),
    ((7, 0), "C4"),
    ((9, 0), "C5"),
    ((11, 0), "C6"),
    ((13, 0), "C7"),
    ((15, 0), "C8"),
    ((17, 0), "C9"),
    ((19, 0), "C10"),
    ((20, 59), "C10"),
    ((21, 0), "C1"),  # after the day's last cut-off: cycle 1, within the same date
    ((23, 59), "C1"),
]


@pytest.mark.parametrize(("hhmm", "cycle"), EDGES)
def test_an_item_is_in_the_first_cycle_whose_cut_off_is_after_its_final_status(hhmm, cycle):
    assert cycle_of(ist(*hhmm), business_date=DAY) == cycle
    assert cycle_of(ist(*hhmm)) == cycle  # the date defaults to the IST day of the time


@pytest.mark.parametrize("cutoff", [c for c in NPCI_CYCLES.cycles if not c.dispute])
def test_just_before_a_cut_off_is_still_in_its_cycle(cutoff: Cycle):
    at = ist(0) + timedelta(minutes=cutoff.cutoff_minute)
    if cutoff.cutoff_minute == 0:  # cycle 1 ends at the midnight that starts the date
        at += timedelta(days=1)
    assert cycle_of(at - TICK) == cutoff.name
    assert cycle_of(at) != cutoff.name


def test_the_cycle_follows_ist_not_utc():
    # 18:29:59 UTC is 23:59:59 IST (cycle 1); 18:30 UTC is 00:00 IST of the next day.
    assert cycle_of(datetime(2026, 3, 1, 18, 29, 59, tzinfo=UTC)) == "C1"
    assert cycle_of(datetime(2026, 3, 1, 18, 30, tzinfo=UTC)) == "C2"
    # 03:30 UTC is 09:00 IST: cycle 5 (by UTC hours it would have been cycle 3).
    assert cycle_of(datetime(2026, 3, 2, 3, 30, tzinfo=UTC)) == "C5"
    with pytest.raises(ValueError, match="time zone"):
        cycle_of(datetime(2026, 3, 2, 9, 0))


def test_an_item_carried_from_a_closed_date_is_in_the_first_cycle_of_the_date_carrying_it():
    yesterday = DAY - timedelta(days=1)
    assert cycle_of(ist(12, 0, yesterday), business_date=DAY) == "C1"
    assert cycle_of(ist(22, 0, yesterday), business_date=DAY) == "C1"
    assert dispute_cycle_of(ist(20, 0, yesterday), business_date=DAY) == "DC1"
    # Its own date: by the time of day, as ever.
    assert cycle_of(ist(12, 0, yesterday), business_date=yesterday) == "C6"


@pytest.mark.parametrize(
    ("hhmm", "cycle"),
    [((0, 0), "DC1"), ((15, 59), "DC1"), ((16, 0), "DC2"), ((23, 59), "DC2")],
)
def test_a_chargeback_is_placed_in_dc1_or_dc2_by_its_time(hhmm, cycle):
    assert dispute_cycle_of(ist(*hhmm)) == cycle
    assert dispute_cycle_of(ist(16) - TICK) == "DC1"


def test_settlement_and_dispute_placement_use_only_their_own_kind():
    for minute in range(0, 24 * 60, 7):
        at = ist(0) + timedelta(minutes=minute)
        assert cycle_of(at).startswith("C") and dispute_cycle_of(at).startswith("DC")


def table(*rows: tuple[str, str, bool]) -> CycleTable:
    return CycleTable.from_entries(
        {"name": name, "cutoff": cutoff, "dispute": dispute} for name, cutoff, dispute in rows
    )


def test_a_configured_table_that_ends_at_midnight_does_not_wrap():
    six = table(
        *((str(n), f"{4 * n:02d}:00", False) for n in range(1, 7)),
        ("D", "24:00", True),
    )
    assert six.names[-2:] == ("6", "D")
    assert cycle_of(ist(0), six) == "1"
    assert cycle_of(ist(3, 59), six) == "1"
    assert cycle_of(ist(4), six) == "2"
    assert cycle_of(ist(23, 59), six) == "6"
    assert dispute_cycle_of(ist(0), six) == dispute_cycle_of(ist(23, 59), six) == "D"


def test_a_configured_first_cycle_may_start_the_evening_before():
    two = table(("early", "06:00", False), ("late", "18:00", False), ("D", "12:00", True))
    assert cycle_of(ist(5, 59), two) == "early"
    assert cycle_of(ist(6), two) == "late"
    assert cycle_of(ist(18), two) == "early"  # 18:00-06:00 is "early", in its own date
    assert dispute_cycle_of(ist(11, 59), two) == dispute_cycle_of(ist(12), two) == "D"


@pytest.mark.parametrize(
    ("text", "minute"), [("00:00", 0), ("05:00", 300), ("23:59", 1439), ("24:00", 1440)]
)
def test_cut_offs_are_hh_mm_from_midnight_to_midnight(text, minute):
    assert parse_cutoff(text) == minute


@pytest.mark.parametrize("text", ["5:00", "24:01", "25:00", "12:60", "noon", "12:00:00", ""])
def test_a_bad_cut_off_is_refused(text):
    with pytest.raises(CycleTableError, match="cut-off"):
        parse_cutoff(text)


D = ("D", "24:00", True)


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ((("A", "12:00", False), ("B", "09:00", False), D), "'B' (09:00) must end after 'A'"),
        ((("A", "12:00", False), ("B", "12:00", False), D), "'B' (12:00) must end after 'A'"),
        (
            (("A", "12:00", False), ("D1", "16:00", True), ("D2", "10:00", True)),
            "dispute cycle 'D2'",
        ),
        ((("A", "12:00", False), ("A", "13:00", False), D), "'A' is listed twice"),
        ((("A", "12:00", False), ("D", "16:00", True), ("A", "20:00", True)), "listed twice"),
        ((("A", "7:00", False), D), "cycle 'A': cut-off '7:00' is not HH:MM"),
        ((("A", "24:30", False), D), "not a time from 00:00 to 24:00"),
        ((("A", "00:00", False), ("B", "24:00", False), D), "'A' would be empty"),
        (((" ", "12:00", False), D), "cycle name ' '"),
        ((D,), "no settlement cycle"),
        ((("A", "12:00", False),), "no dispute cycle"),
    ],
)
def test_a_table_that_cannot_group_a_day_is_refused(rows, problem):
    with pytest.raises(CycleTableError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        table(*rows)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"name": "A", "cut": "12:00"}, "unknown key 'cut'"),
        ({"cutoff": "12:00"}, 'needs a "name"'),
        ({"name": "A"}, 'needs a "cutoff"'),
        ({"name": "A", "cutoff": 1200}, 'needs a "cutoff"'),
        ({"name": "A", "cutoff": "12:00", "dispute": "yes"}, '"dispute" must be true or false'),
    ],
)
def test_a_malformed_entry_is_refused_by_name(entry, problem):
    with pytest.raises(CycleTableError, match=problem):
        CycleTable.from_entries([entry, {"name": "D", "cutoff": "24:00", "dispute": True}])
