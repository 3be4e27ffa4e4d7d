"""Commands the daemon's threads serve (station.requests): every answer has a code, whatever the
work does."""

from __future__ import annotations

import threading

from broker import wait_until

from smearscope.service.station.requests import RequestQueue


def _served(queue: RequestQueue, stop: threading.Event) -> threading.Thread:
    def owner() -> None:
        while not stop.is_set():
            queue.serve_pending()
            stop.wait(0.01)
    thread = threading.Thread(target=owner, daemon=True)
    thread.start()
    return thread


def test_work_that_raises_or_answers_nothing_is_command_failed_and_an_empty_answer_stands() -> None:
    queue, stop = RequestQueue("test"), threading.Event()
    owner = _served(queue, stop)
    try:
        def boom() -> dict:
            raise KeyError("run")
        failed = queue.call("stop_run", boom, timeout=5)
        assert failed == {"ok": False, "error": "command_failed", "message": "KeyError: 'run'"}
        assert queue.call("status", dict, timeout=5) == {}  # an answer, even empty, is the answer
        none = queue.call("status", lambda: None, timeout=5)  # type: ignore[arg-type,return-value]
        assert none["error"] == "command_failed"
    finally:
        stop.set()
        owner.join(2)
    queue.close()
    assert queue.call("reload", lambda: {"ok": True})["error"] == "shutting_down"


def test_a_command_waiting_when_the_owner_ends_is_answered_shutting_down_at_once() -> None:
    """A command queued while the station stops (its owner thread ends without serving it): the
    caller hears "shutting_down" within a tick, not "accepted, result will be published" after
    the 30 s timeout, for a result that will never come."""
    queue = RequestQueue("test")
    ran: list[str] = []
    answers: list[dict] = []

    def stop_run() -> dict:
        ran.append("stop_run")
        return {"ok": True}

    caller = threading.Thread(target=lambda: answers.append(queue.call("stop_run", stop_run)), daemon=True)
    caller.start()
    assert wait_until(lambda: queue._requests.qsize() == 1, 5)  # it waits in the queue now
    queue.close()  # the owner ends: nothing serves the queue again
    caller.join(10)
    assert not caller.is_alive(), "still waiting for an owner that has ended"
    assert answers == [{"ok": False, "error": "shutting_down", "message": "the station is shutting down"}]
    assert ran == []
