import logging

import orjson
import pytest
from pydantic import BaseModel

from core.logging import JsonFormatter
from core.pii import Vpa, mask_text, mask_vpa


@pytest.mark.parametrize(
    ("vpa", "masked"),
    [
        ("rahulkumar@okhdfc", "ra***ar@okhdfc"),
        ("abc@ybl", "a***@ybl"),
        ("success@oksbi", "su***ss@oksbi"),
    ],
)
def test_mask_vpa(vpa, masked):
    assert mask_vpa(vpa) == masked


def test_vpa_type_masks_itself_everywhere_but_value():
    v = Vpa("RahulKumar@OKHDFC")
    assert v.value == "rahulkumar@okhdfc"
    assert str(v) == repr(v)[5:-2] == "ra***ar@okhdfc"
    assert f"{v}" == "ra***ar@okhdfc" and "rahulkumar" not in f"{v!r} {v}"
    assert v.handle == "okhdfc" and v.local == "rahulkumar"


def test_vpa_rejects_bad_grammar():
    for bad in ["no-at-sign", "@okhdfc", "a@", "a b@ok", "x@1bank", "a" * 300 + "@ok"]:
        with pytest.raises(ValueError):
            Vpa(bad)


def test_vpa_serialises_clear_in_models():
    class M(BaseModel):
        v: Vpa

    m = M(v="rahulkumar@okhdfc")
    assert m.model_dump(mode="json") == {"v": "rahulkumar@okhdfc"}
    assert "rahulkumar" not in repr(m)


def test_free_text_masking_does_not_mask_twice():
    assert mask_text("from rahulkumar@okhdfc") == "from ra***ar@okhdfc"
    assert mask_text("from ra***ar@okhdfc") == "from ra***ar@okhdfc"


def test_json_log_lines_carry_fields_and_mask_pii():
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "paid by %s", ("rahulkumar@okhdfc",), None
    )
    record.transaction_id = "UPI1"
    record.payer = "priya.sharma@ybl"
    record.ip = "10.1.2.3"
    line = orjson.loads(JsonFormatter().format(record))
    assert line["msg"] == "paid by ra***ar@okhdfc"
    assert line["transaction_id"] == "UPI1"
    assert line["payer"] == "pr***ma@ybl"
    assert line["ip"] == "***"
    assert "rahulkumar" not in orjson.dumps(line).decode()
