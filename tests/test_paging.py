"""service/paging.py: where each page of BatchGetSecrets and ListSecrets starts and stops."""

from __future__ import annotations

import pytest

from secrets_manager.errors import InvalidInputError
from secrets_manager.service.paging import PAGE_BUDGET_BYTES, Page


def take(page: Page, names: list[str], size: int = 10) -> list[str]:
    taken = []
    for name in page.start(names):
        if not page.has_room() or not page.fits(name, size):
            break
        taken.append(name)
    return taken


def every_page(
    names: list[str], page_size: int, size: int = 10, *, by_position: bool = False
) -> list[list[str]]:
    pages, token = [], ""
    while True:
        page = Page(page_size, token, by_position=by_position)
        pages.append(take(page, names, size))
        token = page.next_token()
        if not token:
            return pages


def test_pages_by_count_cover_every_name_once_in_order() -> None:
    names = [f"a/{i:02d}" for i in range(25)]
    assert every_page(list(reversed(names)), 10) == [names[:10], names[10:20], names[20:]]
    assert every_page(names[:20], 10) == [names[:10], names[10:20]]  # no empty last page
    assert every_page(names, 0) == [names]  # unpaged: everything at once, as before paging


def test_pages_stop_at_the_byte_budget_but_always_hold_one() -> None:
    names = [f"a/{i}" for i in range(5)]
    assert every_page(names, 100, size=PAGE_BUDGET_BYTES // 2) == [names[:2], names[2:4], names[4:]]
    assert every_page(names[:2], 100, size=PAGE_BUDGET_BYTES * 2) == [names[:1], names[1:2]]


def test_a_name_added_between_pages_does_not_shift_the_rest() -> None:
    page = Page(2, "", by_position=False)
    assert take(page, ["a/1", "a/2", "a/3"]) == ["a/1", "a/2"]
    later = Page(2, page.next_token(), by_position=False)
    assert take(later, ["a/0", "a/1", "a/2", "a/3"]) == ["a/3"]


def test_named_requests_page_by_position_in_the_order_asked() -> None:
    asked = ["z/1", "a/1", "m/1"]
    assert every_page(asked, 2, by_position=True) == [["z/1", "a/1"], ["m/1"]]


def test_a_skipped_name_moves_the_next_page_past_it() -> None:
    page = Page(1, "", by_position=False)
    names = iter(page.start(["a/1", "a/2", "a/3"]))
    page.skipped(next(names))  # deleted between list and read
    assert page.has_room() and page.fits(next(names), 10)
    assert not page.has_room()
    assert page.next_token() == "after:a/2"


@pytest.mark.parametrize(
    "token", ["junk", "after:", "after:../x", "at:x", "at:-1", "at:\u0661", "at:" + "9" * 5000]
)
def test_a_forged_token_is_invalid_input(token: str) -> None:
    for by_position in (False, True):
        with pytest.raises(InvalidInputError, match="page_token"):
            list(Page(10, token, by_position=by_position).start(["a/1"]))
