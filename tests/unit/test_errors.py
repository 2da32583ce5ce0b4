import grpc

from airlock_broker.errors import STATUS_TABLE, Failed, Kind, Reason, Rejected, error


def test_every_reason_maps_to_a_status_and_kind() -> None:
    assert set(STATUS_TABLE) == set(Reason)
    for reason, (status, kind) in STATUS_TABLE.items():
        assert isinstance(status, grpc.StatusCode), reason
        assert status is not grpc.StatusCode.OK, reason
        assert isinstance(kind, Kind), reason


def test_error_picks_the_class_from_the_kind() -> None:
    assert isinstance(error(Reason.FORMAT_MISMATCH, "x"), Rejected)
    assert isinstance(error(Reason.SANDBOX_TIMEOUT, "x"), Failed)


def test_only_busy_and_infrastructure_are_retryable_statuses() -> None:
    # The client retries RESOURCE_EXHAUSTED / UNAVAILABLE; an artifact's own failure must never
    # be mapped there, or a hostile file would be converted again and again.
    # SPOOL_FULL is the broker's own disk (gRPC's example of RESOURCE_EXHAUSTED), decided before
    # anything is spooled or converted; the client does not retry it by itself.
    retryable = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
    assert {r for r, (s, _) in STATUS_TABLE.items() if s in retryable} == {
        Reason.BUSY, Reason.SANDBOX_UNAVAILABLE, Reason.SPOOL_FULL}
