"""The chaos history checker, on hand-built histories: a clean one passes, and each kind of
violation it exists for is caught (a gap, a repeat, a frame unlike Replay, a refused control
applied, an accepted one not applied, a head that disagrees, a lost session, ...)."""

from __future__ import annotations

from windflow.chaos.history import (
    AttachRecord,
    Delivered,
    Limits,
    LogRecord,
    Refusal,
    SentControl,
    SessionHistory,
    Violation,
    check_actors,
    check_session,
    frames_checked,
    log_bound,
)


def frames(first: int, last: int, actions: dict[int, int]) -> list[Delivered]:
    """Frames first..last, each showing the control in effect (``actions``: frame -> action,
    sticky), with a digest derived from its index."""
    out, action = [], 0
    for i in range(first, last + 1):
        action = actions.get(i, action)
        out.append(Delivered(i, action, f"d{i}"))
    return out


def clean() -> SessionHistory:
    """Two attaches (the second a resume) and the final one; controls at 0 and 12 applied,
    an out-of-range one refused; Replay, the log and the head agree."""
    first = AttachRecord(
        frames=frames(0, 19, {0: 1, 12: 3}),
        controls=[
            SentControl(0, 0, 1, "valid", answer_by=0),
            SentControl(1, 12, 3, "valid", answer_by=20),
            SentControl(2, 15, 9, "invalid", answer_by=19),
        ],
        refusals=[Refusal(15, "INVALID_ARGUMENT", "action 9 out of range")],
    )
    second = AttachRecord(
        resume_from=20,
        frames=frames(20, 39, {20: 3, 30: 2}),
        controls=[SentControl(3, 30, 2, "valid", answer_by=36)],
    )
    final = AttachRecord(head_before=40, frames=frames(40, 44, {40: 2}), final=True)
    history = SessionHistory("s0", "sid", [first, second, final], head=40, final_head=45)
    history.replay = {f.index: f for f in history.delivered}
    history.log = [
        LogRecord(0, 1),
        LogRecord(12, 3),
        LogRecord(30, 2),
        LogRecord(40, 0, claim=True),
    ]
    history.checkpoints = [0]
    return history


def kinds(found: list[Violation]) -> list[str]:
    return [v.kind for v in found]


def test_a_clean_history_passes() -> None:
    history = clean()
    assert check_session(history) == []
    assert frames_checked(history) == 45


def test_a_gap_within_an_attach() -> None:
    history = clean()
    del history.attaches[0].frames[5]
    found = check_session(history)
    assert kinds(found) == ["gap"]
    assert "frames 5..5 missing" in str(found[0])


def test_a_repeat_within_an_attach_and_across_attaches() -> None:
    history = clean()
    history.attaches[1].frames.insert(3, history.attaches[1].frames[2])
    assert kinds(check_session(history)) == ["repeat"]

    # a fresh attach that begins below frames delivered before (a session put back at a
    # checkpoint, not its head): a repeat, and a head behind the client
    history = clean()
    final = history.attaches[2]
    final.head_before = 36
    final.frames = frames(36, 44, {36: 2})
    history.replay = {f.index: f for f in history.delivered}
    found = check_session(history)
    assert "repeat" in kinds(found) and "head" in kinds(found)


def test_a_resume_that_does_not_start_where_asked() -> None:
    history = clean()
    history.attaches[1].frames = history.attaches[1].frames[2:]
    assert kinds(check_session(history)) == ["gap"]


def test_a_frame_differing_from_replay() -> None:
    history = clean()
    assert history.replay is not None
    for i in (25, 26, 27):
        history.replay[i] = Delivered(i, history.replay[i].action, "other")
    found = check_session(history)
    assert kinds(found) == ["replay"]
    assert "frames 25..27 differ from Replay" in str(found[0])

    history = clean()
    history.replay = None
    history.replay_error = "UNAVAILABLE: no worker"
    assert kinds(check_session(history)) == ["replay"]


def test_a_refused_control_applied() -> None:
    # a control for frame 25, action 4, refused as in the past, yet frames from 25 show it
    history = clean()
    second = history.attaches[1]
    second.controls.append(SentControl(4, 25, 4, "valid", answer_by=38))
    second.refusals.append(Refusal(25, "INVALID_ARGUMENT", "in the past"))
    second.frames = frames(20, 39, {20: 3, 25: 4, 30: 2})
    history.replay = {f.index: f for f in history.delivered}
    history.log = [*(history.log or []), LogRecord(25, 4)]
    found = check_session(history)
    assert kinds(found) == ["refused_applied"]
    assert "frames 25..29" in str(found[0]) and "refused INVALID_ARGUMENT" in str(found[0])


def test_an_accepted_control_not_applied() -> None:
    # the control for frame 30 (no refusal; the stream went well past it) never took effect
    history = clean()
    history.attaches[1].frames = frames(20, 39, {20: 3})
    history.replay = {f.index: f for f in history.delivered}
    history.attaches[2].frames = frames(40, 44, {40: 3})
    history.replay.update({f.index: f for f in history.attaches[2].frames})
    history.log = [LogRecord(0, 1), LogRecord(12, 3)]
    found = check_session(history)
    assert kinds(found) == ["accepted_not_applied"]
    assert "frames 30..44" in str(found[0]) and "expected [2]" in str(found[0])


def test_a_control_whose_answer_never_came_may_go_either_way() -> None:
    # the stream broke before the control's answer could arrive: applied or not, no
    # control violation (the broken stream itself is one)
    for applied in (True, False):
        history = clean()
        second = history.attaches[1]
        second.controls.append(SentControl(4, 38, 0, "valid", answer_by=45))
        second.end = "UNAVAILABLE: worker gone"
        second.frames = frames(20, 39, {20: 3, 30: 2, 38: 0 if applied else 2})
        final = history.attaches[2]
        final.frames = frames(40, 44, {40: 0 if applied else 2})
        history.replay = {f.index: f for f in history.delivered}
        history.log = [*(history.log or []), *([LogRecord(38, 0)] if applied else [])]
        assert kinds(check_session(history)) == ["stream"]


def test_head_disagreeing() -> None:
    history = clean()
    history.head = 30  # behind frames the client has
    found = check_session(history)
    assert kinds(found) == ["head"] and "behind the last delivered frame 39" in str(found[0])

    history = clean()
    history.head = 80
    assert kinds(check_session(history, Limits(head_slack=16))) == ["head"]

    history = clean()
    history.attaches[2].head_before = 44  # the fresh attach did not begin at the head
    assert "head" in kinds(check_session(history))


def test_a_lost_session() -> None:
    history = clean()
    history.attaches.pop()
    history.lost = "no frame within 30 s of a fresh attach: NOT_FOUND"
    history.final_head = 40
    found = check_session(history)
    assert kinds(found) == ["lost"]


def test_a_stream_ended_by_the_server_and_a_stray_refusal() -> None:
    history = clean()
    history.attaches[0].end = "ended normally after 20 of 20 frames"
    history.attaches[1].refusals.append(Refusal(33, "INVALID_ARGUMENT", "?"))
    assert kinds(check_session(history)) == ["stream", "stream"]


def test_the_log_the_head_and_checkpoints_agree() -> None:
    history = clean()
    assert history.log is not None
    history.log.append(LogRecord(50, 1))  # an entry from an abandoned future
    found = check_session(history)
    assert kinds(found) == ["log"] and "past the head 45" in str(found[0])

    history = clean()
    history.log = [LogRecord(0, 1), LogRecord(12, 3)]  # the control at 30 applied, never logged
    found = check_session(history)
    assert kinds(found) == ["log"]
    assert "frames 30..44: action 3 logged, 2 delivered" in str(found[0])

    history = clean()
    history.log = [LogRecord(0, 1)] * (log_bound(3, 3, 0) + 1)
    history.log += [LogRecord(12, 3), LogRecord(30, 2)]
    assert kinds(check_session(history)) == ["log"]

    history = clean()
    history.checkpoints = [48]  # past the head
    assert kinds(check_session(history)) == ["checkpoint"]

    history = clean()
    history.checkpoints = [0, 12, 24]  # more than one per 48 frames
    assert kinds(check_session(history)) == ["checkpoint"]


def test_actors_bounded() -> None:
    assert check_actors(3, 3, "before closing") == []
    (found,) = check_actors(0, 2, "after closing")
    assert found.kind == "actors" and "2 actors for 0 open sessions" in str(found)


def test_a_frame_delivered_twice_is_described_once() -> None:
    history = clean()
    assert history.replay is not None
    final = history.attaches[2]
    final.head_before = 36
    final.frames = frames(36, 44, {36: 2})
    for i in range(36, 45):
        history.replay[i] = Delivered(i, 2, "other")
    found = [v for v in check_session(history) if v.kind == "replay"]
    assert [str(v).split(": ", 1)[1] for v in found] == ["frames 36..44 differ from Replay"]


def test_a_frame_delivered_twice_answers_to_the_controls_sent_before_it() -> None:
    # a stale worker streamed frames 10..19 on after the session moved back to frame 10;
    # the next attach got 10..19 again, shaped by a control sent then: the repeat, the head
    # and the stale copies unlike Replay are the violations, not the control
    first = AttachRecord(
        frames=frames(0, 19, {0: 1}), controls=[SentControl(0, 0, 1, "valid", answer_by=0)]
    )
    second = AttachRecord(
        head_before=10,
        frames=frames(10, 49, {10: 1, 12: 3}),
        controls=[SentControl(1, 12, 3, "valid", answer_by=42)],
    )
    history = SessionHistory("s0", "sid", [first, second], head=50, final_head=50)
    history.replay = {f.index: f for f in second.frames} | {
        f.index: f for f in first.frames if f.index < 10
    }
    found = check_session(history)
    assert kinds(found) == ["repeat", "head", "replay"]
    assert "frames 12..19: action 1 delivered, 3 replayed" in str(found[2])


def test_checkpoint_objects_bounded() -> None:
    history = clean()
    history.objects = 2  # frames 0 and 48: the worker ran ahead of the head 45
    assert check_session(history) == []
    history.objects = 5  # objects orphaned by rewinds and never deleted
    assert kinds(check_session(history)) == ["checkpoint"]
