"""The tensor table's number formats (one notation per column, full precision on hover) and the
pager's page numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ckptscope.web.routes import page_links
from ckptscope.web.templating import colnum, column_style, column_styles, fullnum


@pytest.mark.parametrize(
    ("value", "style", "shown"),
    [
        (0.0123456, "fixed", "0.01235"),
        (12.3456, "fixed", "12.35"),
        (12345.6, "fixed", "12346"),
        (-0.5, "fixed", "-0.5000"),
        (1.5e-7, "sci", "1.500e-07"),
        (0.5, "sci", "5.000e-01"),
        (0.0, "sci", "0"),
        (None, "fixed", "-"),
        (float("nan"), "fixed", "NaN"),
        (float("-inf"), "sci", "-Inf"),
    ],
)
def test_colnum(value, style, shown):
    assert colnum(value, style) == shown


def test_a_column_is_scientific_when_any_value_is_tiny_or_huge():
    assert column_style([0.5, -2.0, 0.0, None]) == "fixed"
    assert column_style([0.5, 1e-4]) == "sci"
    assert column_style([0.5, -1e5]) == "sci"
    assert column_style([0.0, float("nan")]) == "fixed"
    rows = [(None, SimpleNamespace(mean=1e-7, std=0.2)), (None, None), (None, SimpleNamespace(mean=0.1, std=0.3))]
    assert column_styles(rows, ["mean", "std"]) == {"mean": "sci", "std": "fixed"}


def test_fullnum_reads_back_as_the_same_number():
    assert float(fullnum(0.1 + 0.2)) == 0.1 + 0.2
    assert fullnum(1234567) == "1,234,567" and fullnum(None) == "-"


@pytest.mark.parametrize(
    ("page", "pages", "links"),
    [
        (1, 1, [1]),
        (1, 8, [1, 2, 3, None, 8]),
        (5, 10, [1, None, 3, 4, 5, 6, 7, None, 10]),
        (8, 8, [1, None, 6, 7, 8]),
        (4, 8, [1, 2, 3, 4, 5, 6, None, 8]),
    ],
)
def test_page_links(page, pages, links):
    assert page_links(page, pages) == links
