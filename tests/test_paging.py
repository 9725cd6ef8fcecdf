"""service/paging.py: where each page of BatchGetSecrets and ListSecrets starts and stops."""

from __future__ import annotations

import pytest

from secrets_manager.crypto.mac import page_token_mac, value_fingerprint
from secrets_manager.errors import InvalidInputError
from secrets_manager.service.paging import (
    PAGE_BUDGET_BYTES,
    UNPAGED_LIMIT_BYTES,
    Page,
    TokenBinding,
    _framed,
)
from secrets_manager.v1 import secrets_pb2 as pb


def mac(data: bytes) -> str:
    """The server's MAC, under a test key in place of the store's audit key."""
    return page_token_mac(b"k" * 32, data)


def test_a_page_token_mac_is_no_value_fingerprint() -> None:
    """Its own label: a token never tells anyone the audit log's fingerprint of some value."""
    data = b'["ListSecrets","ops",[]]\x00after:a/B'
    assert value_fingerprint(b"k" * 32, data).rpartition(":")[2] != page_token_mac(b"k" * 32, data)


def binding(identity: str = "ops", method: str = "ListSecrets", **request: object) -> TokenBinding:
    return TokenBinding(mac, method, identity, **{"prefix": "", **request})


def test_a_token_under_an_earlier_or_a_newer_audit_key_is_accepted_and_a_forged_one_is_not() -> None:
    """Across an `audit rotate-key` between two pages: the binding signs under the key in force
    and takes a token under any key the store holds, asking the store again (reload) once before
    refusing one, which a replica that has not yet read the new key needs."""
    old_key, new_key = b"o" * 32, b"n" * 32
    asked: list[bool] = []

    def accepted(data: bytes, reload: bool) -> list[str]:
        asked.append(reload)
        held = [new_key, old_key] if reload else [old_key]  # the new key read only on a reload
        return [page_token_mac(key, data) for key in held]

    def under(key: bytes) -> TokenBinding:
        return TokenBinding(lambda data: page_token_mac(key, data), "ListSecrets", "ops", accepted, prefix="")

    issued_before = under(old_key).token("after:a/B")
    assert under(new_key).place(issued_before) == "after:a/B"  # after the rotation, here
    assert asked == [False]
    issued_elsewhere = under(new_key).token("after:a/C")
    assert under(old_key).place(issued_elsewhere) == "after:a/C"  # a replica not yet on the new key
    assert asked == [False, False, True]
    forged = f"{'0' * 24}.after:a/D"
    with pytest.raises(InvalidInputError):
        under(old_key).place(forged)
    with pytest.raises(InvalidInputError):  # a token of another caller, under a key held
        under(old_key).place(
            TokenBinding(lambda d: page_token_mac(old_key, d), "ListSecrets", "auth", prefix="").token(
                "after:a/B"
            )
        )


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
        page = Page(page_size, token, by_position=by_position, binding=binding())
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
    page = Page(2, "", by_position=False, binding=binding())
    assert take(page, ["a/1", "a/2", "a/3"]) == ["a/1", "a/2"]
    later = Page(2, page.next_token(), by_position=False, binding=binding())
    assert take(later, ["a/0", "a/1", "a/2", "a/3"]) == ["a/3"]


def test_named_requests_page_by_position_in_the_order_asked() -> None:
    asked = ["z/1", "a/1", "m/1"]
    assert every_page(asked, 2, by_position=True) == [["z/1", "a/1"], ["m/1"]]


def test_a_skipped_name_moves_the_next_page_past_it() -> None:
    page = Page(1, "", by_position=False, binding=binding())
    names = iter(page.start(["a/1", "a/2", "a/3"]))
    page.skipped(next(names))  # deleted between list and read
    assert page.has_room() and page.fits(next(names), 10)
    assert not page.has_room()
    assert binding().place(page.next_token()) == "after:a/2"


@pytest.mark.parametrize(
    "token", ["junk", "after:", "after:../x", "at:x", "at:-1", "at:\u0661", "at:" + "9" * 5000]
)
def test_a_forged_token_is_invalid_input(token: str) -> None:
    for by_position in (False, True):
        with pytest.raises(InvalidInputError, match="page_token"):
            list(Page(10, token, by_position=by_position, binding=binding()).start(["a/1"]))
        signed = binding().token(token)  # a place no server issues, even with a valid MAC
        with pytest.raises(InvalidInputError, match="page_token"):
            list(Page(10, signed, by_position=by_position, binding=binding()).start(["a/1"]))


# ---- an unpaged answer stays under gRPC's default receive limit ---------------------------------


@pytest.mark.parametrize(
    "length", [0, 1, *range(123, 129), *range(16_378, 16_384), *range(2_097_144, 2_097_150)]
)
def test_framed_size_is_what_the_response_takes(length: int) -> None:
    """Message sizes on both sides of each varint length (127, 16 383, 2 097 151 bytes)."""
    message = pb.SecretVersion(value=b"v" * length)
    assert _framed(message.ByteSize()) == pb.BatchGetSecretsResponse(secrets=[message]).ByteSize()


def test_an_unpaged_answer_over_the_limit_is_refused_saying_to_page() -> None:
    """page_size 0 still gets one answer, up to gRPC's default 4 MiB receive limit; past it the
    request is refused (before the caller audits anything as read), saying to set page_size."""
    count = 64
    size = 65_536
    assert count * _framed(size) == UNPAGED_LIMIT_BYTES + count * 4  # just over
    names = [f"a/{i:03d}" for i in range(count)]
    with pytest.raises(InvalidInputError, match="set page_size"):
        every_page(names, 0, size=size)
    fitting = UNPAGED_LIMIT_BYTES // count - 4  # framed: 1 tag byte, 3 length bytes
    assert count * _framed(fitting) == UNPAGED_LIMIT_BYTES
    assert every_page(names, 0, size=fitting) == [names]  # exactly at the limit: one answer
    assert every_page(names, 100, size=size) == [names[:32], names[32:]]  # paged: 2 MiB pages


# ---- a token is bound to the request it pages ----------------------------------------------------


def test_a_token_is_refused_with_another_request_caller_or_method() -> None:
    names = [f"a/{i}" for i in range(5)]
    page = Page(2, "", by_position=False, binding=binding(prefix="a/"))
    assert take(page, names) == ["a/0", "a/1"]
    token = page.next_token()
    assert take(Page(2, token, by_position=False, binding=binding(prefix="a/")), names) == ["a/2", "a/3"]
    for other in (
        binding(prefix="b/"),
        binding("auth", prefix="a/"),
        binding(prefix="a/", include_deleted=True),
        binding(method="BatchGetSecrets", prefix="a/"),
    ):
        with pytest.raises(InvalidInputError, match="without page_token"):
            Page(2, token, by_position=False, binding=other)
    for old in ("after:a/1", "at:2"):  # a token from before tokens were bound
        with pytest.raises(InvalidInputError, match="without page_token"):
            Page(2, old, by_position=old.startswith("at:"), binding=binding(prefix="a/"))


def test_a_position_token_is_bound_to_the_names_list() -> None:
    asked = ["z/1", "a/1", "m/1"]
    bound = binding(method="BatchGetSecrets", names=asked)
    page = Page(1, "", by_position=True, binding=bound)
    assert take(page, asked) == ["z/1"]
    token = page.next_token()
    assert "z/1" not in token and "a/1" not in token  # the names asked are in no token
    again = binding(method="BatchGetSecrets", names=asked)
    assert take(Page(1, token, by_position=True, binding=again), asked) == ["a/1"]
    with pytest.raises(InvalidInputError, match="without page_token"):
        Page(1, token, by_position=True, binding=binding(method="BatchGetSecrets", names=["m/1"]))


def test_what_paging_by_prefix_guarantees_across_changes_between_pages() -> None:
    """The proto's and README's words: pages are not a snapshot. A secret there throughout is
    returned once; one created between pages only if it sorts after the previous page's last name;
    one deleted before its page is not returned (and nothing shifts or repeats)."""
    store = ["p/s0", "p/s1", "p/s2", "p/s3", "p/s4", "p/s5", "p/s6"]
    page = Page(3, "", by_position=False, binding=binding(prefix="p/"))
    seen = take(page, store)
    assert seen == ["p/s0", "p/s1", "p/s2"]
    store = [n for n in store if n not in ("p/s0", "p/s3")] + ["p/s1a", "p/s5a"]  # between pages
    token = page.next_token()
    while token:
        page = Page(3, token, by_position=False, binding=binding(prefix="p/"))
        seen += take(page, store)
        token = page.next_token()
    assert seen == ["p/s0", "p/s1", "p/s2", "p/s4", "p/s5", "p/s5a", "p/s6"]  # no p/s1a, no p/s3


def test_start_sorted_pages_a_sorted_list_as_start_pages_its_names() -> None:
    """The service pages the store's sorted listing by bisection (no sort, no scan of the names
    before the token's place): the same pages as `start` over the names."""
    names = [f"a/{i:03d}" for i in range(250)]
    by_bisection, token = [], ""
    while True:
        page = Page(40, token, by_position=False, binding=binding())
        taken = []
        for item in page.start_sorted([(name, len(name)) for name in names], lambda item: item[0]):
            if not page.has_room() or not page.fits(item[0], item[1]):
                break
            taken.append(item[0])
        by_bisection.append(taken)
        token = page.next_token()
        if not token:
            break
    assert by_bisection == every_page(names, 40)
    with pytest.raises(TypeError):
        next(Page(40, "", by_position=True, binding=binding()).start_sorted(names, str))
