"""The handshake's contract is declared: every request of every call implements `Request` (or `WriterRequest`, for
the calls with one writer), and a request that leaves out part of the contract cannot be made."""

from __future__ import annotations

import pytest

from shardsave.ranks.handshake import Request, WriterRequest


def test_every_call_s_request_declares_the_contract():
    from shardsave.load.pretrained import _Prepared
    from shardsave.merged.planning import MergedPlan
    from shardsave.save.gathered import _Gather
    from shardsave.save.request import SaveRequest

    for request in (SaveRequest, _Gather, MergedPlan):
        assert issubclass(request, WriterRequest), request
    assert issubclass(_Prepared, Request) and not issubclass(_Prepared, WriterRequest)


def test_a_request_without_view_or_restage_cannot_be_made():
    class Partial(WriterRequest):
        def view(self) -> dict:
            return {}

    with pytest.raises(TypeError, match="restage"):
        Partial()
