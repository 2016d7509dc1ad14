"""Validate: the verdict on each remaining image, from its single decode."""

import pandas as pd
import pytest

from photoprep.core import params
from photoprep.core.errors import UserError
from photoprep.core.params import ValidateParams
from photoprep.images import validate
from photoprep.images.reasons import BROKEN_REASONS, DECODE_REASONS


def _deduped() -> pd.DataFrame:
    rows = [
        ("ok", "", "", 640, 480),
        ("small", "", "", 20, 480),
        ("huge", "", "too_many_pixels", 10000, 10000),  # the probe refused it
        ("trunc", "", "truncated", 640, 480),
        ("dup", "s/ok", "", 640, 480),
        ("failed", "", None, None, None),
    ]
    return pd.DataFrame(
        {
            "source": "s",
            "id": [r[0] for r in rows],
            "url": "u",
            "status": ["ok"] * 5 + ["failed"],
            "fetch_reason": [""] * 5 + ["http_404"],
            "dup_of": [r[1] for r in rows],
            "decode_reason": [r[2] for r in rows],
            "width": [r[3] for r in rows],
            "height": [r[4] for r in rows],
            "format": "JPEG",
            "mode": "RGB",
            "mime": "image/jpeg",
            "size": 10,
        }
    )


def test_each_remaining_image_gets_a_verdict_and_a_reason():
    checked = validate.validate_images(_deduped(), ValidateParams(min_side=32))
    verdicts = dict(zip(checked["id"], checked["reason"], strict=False))
    assert verdicts == {"ok": "", "small": "too_small", "huge": "too_many_pixels", "trunc": "truncated"}
    assert list(checked["valid"]) == [True, False, False, False]


def test_counts_and_report_keep_every_rejected_image():
    checked = validate.validate_images(_deduped(), ValidateParams())
    assert validate.validate_counts(checked) == {
        "broken": 3,
        "broken_by_reason": {"too_many_pixels": 1, "too_small": 1, "truncated": 1},
        "valid": 1,
    }
    assert list(validate.broken_report(checked)["id"]) == ["small", "huge", "trunc"]


def test_the_reasons_are_the_decodes_and_one_of_its_own():
    assert (*DECODE_REASONS, "too_small") == BROKEN_REASONS
    checked = validate.validate_images(_deduped(), ValidateParams())
    assert set(checked["reason"]) - {""} <= set(BROKEN_REASONS)


def test_a_decode_limit_under_validate_says_where_it_moved():
    with pytest.raises(UserError, match=r"^params.yaml: validate.max_pixels: moved to decode.max_pixels"):
        params.parse({"validate": {"max_pixels": 100}})
