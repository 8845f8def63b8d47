"""parse_load_report: the custom_load agent's JSON body to a load in [0, 1]."""

from __future__ import annotations

import pytest

from halb.health.agent import parse_load_report


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"cpu": 0.4, "mem": 0.7}', 0.7),
        (b'{"cpu": 0.9, "mem": 0.2}', 0.9),
        (b'{"cpu": 0.25}', 0.25),
        (b'{"mem": 0}', 0.0),
        (b'{"load": 0.5, "cpu": 0.1}', 0.5),
        (b'{"cpu": 1}', 1.0),
        (b'{"cpu": 1.7}', 1.0),  # clamped
        (b'{"cpu": -0.3, "mem": -1}', 0.0),  # clamped
        (b'{"cpu": 0.3, "disk": "full", "host": "web1"}', 0.3),  # other fields ignored
        (b'  {"cpu": 0.3}\n', 0.3),
        ('{"cpu": 0.6}'.encode("utf-16"), 0.6),  # json.loads detects UTF-16
    ],
)
def test_good_reports(body: bytes, expected: float) -> None:
    assert parse_load_report(body) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid JSON"),
        (b"not json", "not valid JSON"),
        (b'{"cpu": 0.4', "not valid JSON"),
        (b"\xff\xfe\xfd", "not valid JSON"),
        (b"[0.4, 0.7]", "must be a JSON object"),
        (b"0.5", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b'"cpu"', "must be a JSON object"),
        (b"{}", "none of the fields"),
        (b'{"disk": 0.4}', "none of the fields"),
        (b'{"cpu": "0.4"}', "'cpu' must be a number"),
        (b'{"cpu": null}', "'cpu' must be a number"),
        (b'{"mem": true}', "'mem' must be a number"),
        (b'{"cpu": [0.4]}', "'cpu' must be a number"),
        (b'{"cpu": NaN}', "must be finite"),
        (b'{"load": Infinity}', "must be finite"),
    ],
)
def test_bad_reports(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_load_report(body)
