"""Pure fraud tests: each scorer, the combiner, the time budget, the simulator, the model
artefact's safety checks. No database."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.config import load_settings
from core.errors import ConfigError
from core.events import FraudDecision
from core.sandbox import SWITCH_SANDBOX_PAYERS
from fraud.cities import CITIES
from fraud.combiner import Thresholds, combine
from fraud.engine import FraudEngine
from fraud.features import (
    FEATURE_NAMES,
    History,
    Txn,
    feature_vector,
    haversine_km,
    large_vs_usual,
    milli_log,
)
from fraud.history import HistoryTracker
from fraud.model import ARTIFACTS, load_model
from fraud.scorers import DeviceScorer, LocationScorer, Signal, VelocityScorer, noisy_or
from fraud.simulator import TYPOLOGIES, simulate
from npcisim.mock import SANDBOX_CODES

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
MUMBAI, DELHI, PUNE = CITIES["Mumbai"], CITIES["Delhi"], CITIES["Pune"]


def txn(amount: int = 50_000, at: datetime = T0, **kw: object) -> Txn:
    base: dict[str, object] = {"payer": "ravi@okhdfc", "payee": "shop@okicici", "device_id": "d1"}
    base.update(kw)
    return Txn(amount_paise=amount, at=at, **base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- features


def test_haversine_mumbai_delhi_is_about_1150_km():
    assert 1_140 < haversine_km(MUMBAI, DELHI) < 1_160
    assert haversine_km(MUMBAI, MUMBAI) == 0


def test_feature_vector_has_one_value_per_feature_name():
    assert len(feature_vector(txn(), History())) == len(FEATURE_NAMES)


# --------------------------------------------------------------------------- velocity


def test_velocity_quiet_payer_scores_zero():
    assert VelocityScorer().score(txn(), History(payer_count_1m=1, payer_count_1h=3)).score == 0


def test_velocity_burst_in_a_minute_is_flagged_and_grows_with_the_burst():
    v = VelocityScorer()
    four = v.score(txn(), History(payer_count_1m=4))
    ten = v.score(txn(), History(payer_count_1m=10))
    assert four.reasons == ("VELOCITY_PAYER_1M",) and 0.5 <= four.score < ten.score <= 0.9


def test_velocity_hour_day_amount_device_and_payee_windows():
    v = VelocityScorer()
    assert "VELOCITY_PAYER_1H" in v.score(txn(), History(payer_count_1h=20)).reasons
    assert "VELOCITY_PAYER_24H" in v.score(txn(), History(payer_count_24h=45)).reasons
    big_day = v.score(txn(5_000_000), History(payer_amount_24h=16_000_000))
    assert "VELOCITY_AMOUNT_24H" in big_day.reasons
    assert "VELOCITY_DEVICE_1H" in v.score(txn(), History(device_count_1h=20)).reasons
    fan_in = v.score(txn(), History(payee_payers_1h=200))
    assert fan_in.reasons == ("VELOCITY_PAYEE_FAN_IN",) and fan_in.score < 0.4  # shops are busy


# --------------------------------------------------------------------------- location


def test_impossible_travel_mumbai_to_delhi_in_ten_minutes():
    h = History(last_location=MUMBAI, seconds_since_last=600, payer_payments_ever=3)
    s = LocationScorer().score(txn(location=DELHI), h)
    assert s.reasons == ("IMPOSSIBLE_TRAVEL",) and s.score >= 0.6


def test_a_flight_mumbai_to_delhi_in_three_hours_is_fine():
    h = History(last_location=MUMBAI, seconds_since_last=3 * 3600, payer_payments_ever=3)
    assert LocationScorer().score(txn(location=DELHI), h).score == 0


def test_short_hops_are_gps_noise_not_travel():
    h = History(last_location=MUMBAI, seconds_since_last=30, payer_payments_ever=3)
    near = (MUMBAI[0] + 0.05, MUMBAI[1] + 0.05)
    assert LocationScorer().score(txn(location=near), h).score == 0


def test_far_from_usual_places_only_for_established_payers():
    far = History(usual_places=(MUMBAI,), payer_payments_ever=10)
    assert LocationScorer().score(txn(location=DELHI), far).reasons == ("FAR_FROM_USUAL_PLACES",)
    newish = History(usual_places=(MUMBAI,), payer_payments_ever=2)
    assert LocationScorer().score(txn(location=DELHI), newish).score == 0


# --------------------------------------------------------------------------- device


def test_first_payment_on_a_steady_device_is_not_suspicious():
    assert DeviceScorer().score(txn(), History()).score == 0


def test_a_known_device_is_quiet_and_a_new_one_is_a_small_signal():
    known = History(payer_payments_ever=5, device_known_for_payer=True, payer_median_amount=50_000)
    assert DeviceScorer().score(txn(), known).score == 0
    new = History(payer_payments_ever=5, device_known_for_payer=False, payer_median_amount=50_000)
    s = DeviceScorer().score(txn(), new)
    assert s.reasons == ("DEVICE_NEW_FOR_PAYER",) and s.score < 0.4


def test_new_device_then_high_value_is_a_takeover_shape():
    h = History(payer_payments_ever=5, device_known_for_payer=False, payer_median_amount=50_000)
    s = DeviceScorer().score(txn(4_000_000), h)
    assert s.reasons == ("DEVICE_CHANGE_BEFORE_HIGH_VALUE",) and s.score >= 0.6


def test_recent_device_change_before_high_value_is_sim_swap():
    h = History(
        payer_payments_ever=5,
        device_known_for_payer=True,
        payer_median_amount=50_000,
        seconds_since_device_change=1800,
    )
    assert DeviceScorer().score(txn(4_000_000), h).reasons == ("SIM_SWAP_PATTERN",)
    settled = History(
        payer_payments_ever=5,
        device_known_for_payer=True,
        payer_median_amount=50_000,
        seconds_since_device_change=30 * 86_400,
    )
    assert DeviceScorer().score(txn(4_000_000), settled).score == 0


def test_mule_device_and_emulator_flags():
    s = DeviceScorer().score(txn(), History(device_vpas_24h=6))
    assert s.reasons == ("DEVICE_SHARED_BY_MANY_VPAS",) and s.score >= 0.5
    assert DeviceScorer().score(txn(), History(device_vpas_24h=1)).score == 0
    flagged = DeviceScorer().score(txn(emulator=True, rooted=True), History())
    assert set(flagged.reasons) == {"DEVICE_EMULATOR", "DEVICE_ROOTED"}


# --------------------------------------------------------------------------- combiner


def test_noisy_or_is_not_a_sum_and_stays_in_range():
    assert noisy_or([]) == 0
    assert noisy_or([0.5, 0.5]) == pytest.approx(0.75)
    assert noisy_or([0.9, 0.9, 0.9, 0.9]) < 1
    assert noisy_or([0.3, 0]) == pytest.approx(0.3)


def test_combiner_weights_thresholds_and_reasons():
    signals = {
        "velocity": Signal(0.5, ("VELOCITY_PAYER_1M",)),
        "location": Signal(0.0),
        "device": Signal(0.0),
        "model": Signal(0.4, ("MODEL_HIGH_RISK",)),
    }
    a = combine(signals)
    assert a.score == pytest.approx(1 - 0.5 * (1 - 0.8 * 0.4))
    assert a.decision is FraudDecision.STEP_UP
    assert a.reasons == ("VELOCITY_PAYER_1M", "MODEL_HIGH_RISK")
    assert combine({"velocity": Signal(0.75)}).decision is FraudDecision.BLOCK
    assert combine({"velocity": Signal(0.1)}).decision is FraudDecision.ALLOW
    strict = Thresholds(block=0.9, step_up=0.05)
    assert combine({"velocity": Signal(0.1)}, thresholds=strict).decision is FraudDecision.STEP_UP


def test_skipped_scorers_are_named_and_all_failing_is_a_step_up_never_an_allow():
    some = combine({"velocity": Signal(0.0)}, skipped=("model",))
    assert some.skipped == ("model",) and "SCORER_SKIPPED_MODEL" in some.reasons
    none = combine({}, skipped=("velocity", "location", "device", "model"))
    assert none.decision is FraudDecision.STEP_UP
    assert none.reasons[0] == "FRAUD_SCORERS_UNAVAILABLE" and len(none.skipped) == 4


def test_thresholds_must_be_ordered_and_bad_config_names_the_variable():
    with pytest.raises(ValueError):
        Thresholds(block=0.3, step_up=0.5)
    with pytest.raises(ConfigError, match="UPI_FRAUD_STEP_UP_THRESHOLD"):
        load_settings(fraud_block_threshold=0.3, fraud_step_up_threshold=0.5)


# --------------------------------------------------------------------------- budgets


class Slow:
    name = "model"

    def score(self, txn: Txn, history: History) -> Signal:
        time.sleep(0.3)
        return Signal(0.99, ("NEVER_SEEN",))


class Broken:
    name = "location"

    def score(self, txn: Txn, history: History) -> Signal:
        raise RuntimeError("boom")


class Fixed:
    def __init__(self, name: str, score: float) -> None:
        self.name = name
        self.value = score

    def score(self, txn: Txn, history: History) -> Signal:
        return Signal(self.value)


async def test_a_slow_scorer_is_skipped_within_its_budget_and_named():
    engine = FraudEngine(
        [Fixed("velocity", 0.1), Slow(), Broken()],
        budgets_s={"velocity": 0.05, "model": 0.05, "location": 0.05},
    )
    started = time.perf_counter()
    a = await engine.assess(txn(), History())
    elapsed = time.perf_counter() - started
    engine.close()
    assert set(a.skipped) == {"model", "location"}
    assert "NEVER_SEEN" not in a.reasons and a.scores == {"velocity": 0.1}
    assert a.decision is FraudDecision.ALLOW
    assert elapsed < 0.3  # did not wait for the slow one


async def test_all_scorers_failing_steps_up():
    engine = FraudEngine([Slow(), Broken()], budgets_s={"model": 0.02, "location": 0.02})
    a = await engine.assess(txn(), History())
    engine.close()
    assert a.decision is FraudDecision.STEP_UP and set(a.skipped) == {"model", "location"}


async def test_scorers_run_concurrently():
    class Sleeper:
        def __init__(self, name: str) -> None:
            self.name = name

        def score(self, txn: Txn, history: History) -> Signal:
            time.sleep(0.1)
            return Signal(0.0)

    engine = FraudEngine(
        [Sleeper(n) for n in ("a", "b", "c", "d")], budgets_s=dict.fromkeys("abcd", 1.0)
    )
    started = time.perf_counter()
    a = await asyncio.wait_for(engine.assess(txn(), History()), 2)
    engine.close()
    assert not a.skipped and time.perf_counter() - started < 0.35  # not 4 x 0.1 s


# --------------------------------------------------------------------------- history


def test_history_windows_and_device_change():
    h = HistoryTracker()
    for i in range(5):
        t = txn(10_000 + i, T0 + timedelta(seconds=10 * i), location=MUMBAI)
        h.observe(t)
    now = h.history(txn(99_999, T0 + timedelta(seconds=55), device_id="d2", location=PUNE))
    assert (now.payer_count_1m, now.payer_count_1h, now.payer_payments_ever) == (5, 5, 5)
    assert now.payer_median_amount == 10_002
    assert not now.device_known_for_payer and now.seconds_since_device_change == 0
    assert now.last_location == MUMBAI and now.seconds_since_last == 15
    later = h.history(txn(1, T0 + timedelta(minutes=2)))
    assert later.payer_count_1m == 0 and later.payer_count_1h == 5


def test_bursts_and_usual_amounts_in_the_history():
    """Issue 18, bursts and collect requests: the time since the payer's previous payment,
    its payments to this payee in 10 minutes, its usual amount (the milli-decades summed)
    and, for the payee, its payers of the hour who paid far above their usual."""
    h = HistoryTracker()
    for i, amount in enumerate((10_000, 100_000, 1_000_000)):
        h.observe(txn(amount, T0 + timedelta(seconds=20 * i), payee="drain@ybl"))
    now = h.history(txn(500_000, T0 + timedelta(seconds=55), payee="drain@ybl"))
    assert now.seconds_since_prev == 15
    assert now.payer_to_payee_10m == 3
    assert now.payer_milli_log_sum == 4_000 + 5_000 + 6_000
    # ₹10,000 after ₹100 and ₹1,000 is far above; ₹1,000 after ₹100 is under ₹1,000.
    assert (now.young_payee_payers, now.young_payee_large_payers) == (1, 1)
    other = h.history(txn(500_000, T0 + timedelta(minutes=11), payee="shop@okicici"))
    assert (other.payer_to_payee_10m, other.young_payee_large_payers) == (0, 0)
    # A day after its first payment the payee is no longer young: nothing counted.
    later = h.history(txn(500_000, T0 + timedelta(days=1), payee="drain@ybl"))
    assert (later.young_payee_payers, later.young_payee_large_payers) == (0, 0)
    assert h.history(txn(1, T0 + timedelta(days=2))).seconds_since_prev is None


def test_large_vs_usual_needs_a_usual_and_three_times_it():
    usual = 2 * milli_log(100_000)  # two payments of ₹1,000
    assert large_vs_usual(300_000, 2, usual) and not large_vs_usual(290_000, 2, usual)
    assert not large_vs_usual(300_000, 0, 0)  # a first payment has no usual
    assert not large_vs_usual(90_000, 1, milli_log(100))  # ₹900: not a large sum at all


def test_new_features_follow_the_history():
    f = dict(
        zip(
            FEATURE_NAMES,
            feature_vector(
                txn(1_000_000),
                History(
                    seconds_since_prev=9,
                    payer_to_payee_10m=2,
                    payee_first_seen_s=600,
                    payee_payers_1h=4,
                    young_payee_large_payers=3,
                    payee_structured_payers_1h=1,
                    payer_payments_ever=2,
                    payer_milli_log_sum=2 * milli_log(100_000),
                ),
            ),
            strict=True,
        )
    )
    assert f["log_seconds_since_prev"] == 1.0 and f["payer_to_payee_10m"] == 2
    assert f["young_payee_large_payers"] == 3 and f["young_payee_structured_share_1h"] == 0.25
    assert f["log_amount_vs_usual"] == 1.0  # ₹10,000 against a usual ₹1,000
    old = dict(
        zip(
            FEATURE_NAMES,
            feature_vector(txn(), History(payee_first_seen_s=3 * 86_400, payee_payers_1h=3)),
            strict=True,
        )
    )
    assert old["young_payee_structured_share_1h"] == 0  # a shop's size is not a feature
    never = feature_vector(txn(), History())
    assert never[FEATURE_NAMES.index("log_seconds_since_prev")] == pytest.approx(4.9365, abs=1e-4)


def test_a_young_payee_paid_far_above_usual_by_known_customers_is_a_collect_scam():
    v = VelocityScorer()
    usual = 3 * milli_log(50_000)  # three payments of ₹500
    scam = History(
        payee_first_seen_s=1_800,
        young_payee_payers=3,
        young_payee_large_payers=3,
        payer_payments_ever=3,
        payer_milli_log_sum=usual,
    )
    hit = v.score(txn(15_000_00), scam)
    assert hit.reasons == ("PAYEE_YOUNG_LARGE_FAN_IN",) and hit.score >= 0.35
    assert v.score(txn(1_000_00), scam).score == 0  # ₹1,000: twice the usual, not more
    old = dataclasses.replace(scam, payee_first_seen_s=20 * 86_400)
    assert v.score(txn(15_000_00), old).score == 0  # a shop known for weeks
    shop = dataclasses.replace(scam, young_payee_payers=7)  # 3 of its 7 customers
    assert v.score(txn(15_000_00), shop).score == 0
    alone = dataclasses.replace(scam, young_payee_payers=1, young_payee_large_payers=1)
    assert v.score(txn(15_000_00), alone).score == 0  # one customer's large payment


def test_a_new_shops_price_points_are_not_a_mule_fan_in():
    """First-time payers to a young payee, this one at ₹9,999: a mule ring when most of
    its payers paid structured sums, a new shop's price when few did."""
    v = VelocityScorer()
    ring = History(
        payee_first_seen_s=300,
        payee_payers_10m=6,
        payee_new_payers_10m=6,
        payee_structured_payers_10m=5,
    )
    assert "PAYEE_NEW_FAN_IN" in v.score(txn(9_999_00), ring).reasons
    shop = dataclasses.replace(ring, payee_structured_payers_10m=1)
    assert v.score(txn(9_999_00), shop).reasons == ("AMOUNT_STRUCTURING",)


# --------------------------------------------------------------------------- simulator


def test_simulator_is_deterministic_and_has_every_typology():
    a = simulate(3, payers=300, days=1.0, scale=0.2)
    b = simulate(3, payers=300, days=1.0, scale=0.2)
    assert a == b
    assert {t.typology for t in a} == {"legit", *TYPOLOGIES}
    assert all(t.fraud == (t.typology != "legit") for t in a)
    assert [t.txn.at for t in a] == sorted(t.txn.at for t in a)
    assert simulate(4, payers=300, days=1.0, scale=0.2) != a


# --------------------------------------------------------------------------- model artefact


def test_shipped_model_loads_with_its_version_and_features():
    model = load_model()
    meta = json.loads((ARTIFACTS / "model.json").read_text())
    assert model.version == meta["version"] and model.version.startswith("hgb-")
    assert meta["features"] == list(FEATURE_NAMES) and meta["held_out"]["roc_auc"] >= 0.95


def test_a_tampered_model_file_is_refused(tmp_path: Path):
    shutil.copytree(ARTIFACTS, tmp_path / "m")
    path = tmp_path / "m" / "model.skops"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    model = load_model(tmp_path / "m")  # the engine's trees are their own file
    with pytest.raises(ValueError, match="SHA-256"):
        model.estimator  # noqa: B018 (read when asked for: training, fraud evaluate)


def test_a_model_file_with_untrusted_types_is_refused(tmp_path: Path):
    import hashlib
    import os

    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    target = tmp_path / "evil"
    target.mkdir()
    sio.dump(FunctionTransformer(func=os.system), target / "model.skops")
    meta = json.loads((ARTIFACTS / "model.json").read_text())
    meta["sha256"] = hashlib.sha256((target / "model.skops").read_bytes()).hexdigest()
    del meta["trees_sha256"]  # no trees file: the estimator is loaded, and compiled, at once
    (target / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="untrusted"):
        load_model(target)


def test_sandbox_payer_lists_agree_between_switch_and_fraud():
    assert set(SANDBOX_CODES) == SWITCH_SANDBOX_PAYERS


def test_compiled_trees_give_exactly_the_models_probabilities():
    from fraud.model import CompiledTrees, _dataset

    model = load_model().estimator
    xs, _, _ = _dataset(5, payers=200, days=1.0, scale=0.3)
    reference = model.predict_proba(xs)[:, 1]
    compiled = CompiledTrees.of(model)
    assert len(xs) > 500
    assert (
        max(abs(compiled.predict_one(x) - float(r)) for x, r in zip(xs, reference, strict=True))
        < 1e-12
    )
