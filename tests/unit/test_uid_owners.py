"""A user's subordinate uids (/etc/subuid) count as that user's for the per-user bounds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from airlock_broker.fastpath import peer_identity
from airlock_broker.security.uid_owners import MAX_BYTES, UidOwners


def test_a_subordinate_uid_belongs_to_the_user_who_owns_its_range(tmp_path: Path) -> None:
    subuid = tmp_path / "subuid"
    subuid.write_text("root:100000:65536\n"  # a name this host knows
                      "1000:165536:65536\n"  # a uid
                      "# a comment\n\n"
                      "nosuchuser-xyz:231072:10\n"  # a name it does not know: a key of its own
                      "alice:1:2:3\n")  # malformed: skipped
    owners = UidOwners.load(subuid)
    assert len(owners) == 3
    assert [owners.owner(u) for u in (100000, 165535, 165536, 231071)] == [0, 0, 1000, 1000]
    assert owners.owner(231072) == owners.owner(231081) < 0  # never a real uid
    assert [owners.owner(u) for u in (99999, 231082, 1000, 2**32 - 2)] == \
        [99999, 231082, 1000, 2**32 - 2]  # not subordinate: their own


def test_no_file_an_unreadable_one_or_a_huge_one_is_no_harm(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert len(UidOwners.load(tmp_path / "missing")) == 0
    huge = tmp_path / "subuid"
    huge.write_text("1000:100000:65536\n" + "#" * MAX_BYTES)
    with caplog.at_level(logging.WARNING):
        assert UidOwners.load(huge).owner(100001) == 1000
    assert "only its start is read" in caplog.text
    overlapping = UidOwners([(100, 200, 1), (150, 250, 2)])
    assert [overlapping.owner(u) for u in (160, 220)] == [1, 220]


def test_a_users_subordinate_uids_share_its_tickets() -> None:
    """Processes in a user namespace ask as each of the user's 65,536 subordinate uids: per
    uid, the bound was 65,536 times as wide, and a flood of them could push out a genuine
    ticket from the table's total bound."""
    owners = UidOwners([(100000, 165536, 1000)])
    tickets = peer_identity.PeerTickets(per_uid=4, max_total=16, owners=owners)
    genuine = tickets.issue(2000)
    flood = [tickets.issue(100000 + n) for n in range(64)]
    assert len(tickets) == 5  # the user's 4, and the genuine one
    assert tickets.redeem(genuine) == 2000
    assert tickets.redeem(flood[-1]) == 100063  # a ticket still names the uid that asked
