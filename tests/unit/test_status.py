"""``windflow status``'s pure pieces: the session rows and the table, and ``--watch``'s
refresh in place."""

from __future__ import annotations

from windflow.cli.status import (
    CLEAR_BELOW,
    CLEAR_LINE_END,
    CLEAR_SCREEN,
    HOME,
    refresh,
    render,
    session_rows,
)
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb


def _record(session_id: str, state: int, tenant: str = "acme", head: int = 0) -> pb.Session:
    return pb.Session(
        session_id=session_id,
        tenant=tenant,
        state=state,  # type: ignore[arg-type]
        head_frame=head,
        spec=pb.SessionSpec(model_id="windflow-world", fps=24, steps=4),
    )


def test_session_rows_say_where_each_session_is() -> None:
    records = [
        _record("streaming", pb.SESSION_STATE_STREAMING),
        _record("idle", pb.SESSION_STATE_PLACED),
        _record("parked", pb.SESSION_STATE_PLACED, head=7),
        _record("moving", pb.SESSION_STATE_PLACED),
        _record("closed", pb.SESSION_STATE_CLOSED, head=3),
    ]
    placements = {
        "parked": internal_pb2.PlacementRecord(parked=True, parked_head=90),
        "moving": internal_pb2.PlacementRecord(worker_id="worker-2", epoch=3),
        "streaming": internal_pb2.PlacementRecord(worker_id="worker-1", epoch=1),
    }
    statuses = {
        "streaming": (
            "worker-1",
            internal_pb2.SessionStatus(
                session_id="streaming",
                head_frame=120,
                attached=True,
                fps=12.0,
                steps=2,
                level=2,
                dropped=1,
                deadline_misses=4,
            ),
        ),
        "idle": ("worker-2", internal_pb2.SessionStatus(session_id="idle", head_frame=5, fps=24)),
    }
    rows = {r["session_id"]: r for r in session_rows(records, placements, statuses)}
    assert set(rows) == {"streaming", "idle", "parked", "moving"}  # closed: left out
    streaming = rows["streaming"]
    assert streaming["state"] == "streaming" and streaming["worker"] == "worker-1"
    assert (streaming["fps"], streaming["level"], streaming["steps"]) == (12.0, 2, 2)
    assert (streaming["head_frame"], streaming["dropped"], streaming["deadline_misses"]) == (
        120,
        1,
        4,
    )
    assert rows["idle"]["state"] == "placed" and not rows["idle"]["attached"]
    assert rows["parked"]["state"] == "parked" and rows["parked"]["head_frame"] == 90
    assert rows["parked"]["worker"] == ""
    assert rows["moving"]["state"] == "moving" and rows["moving"]["worker"] == "worker-2"
    everything = session_rows(records, placements, statuses, include_closed=True)
    closed = next(r for r in everything if r["session_id"] == "closed")
    assert closed["state"] == "closed" and closed["head_frame"] == 3


def test_render_shows_workers_routers_and_sessions_as_columns() -> None:
    snap = {
        "workers": [
            {
                "worker_id": "worker-1",
                "address": "127.0.0.1:1",
                "region": "eu-west",
                "models": ["windflow-world", "wan"],
                "sessions": 1,
                "capacity": 8,
                "load": 0.125,
                "utilization": 0.5,
                "draining": False,
            },
            {
                "worker_id": "worker-22",
                "address": "127.0.0.1:2",
                "region": "local",
                "models": ["windflow-world"],
                "sessions": 0,
                "capacity": 0,
                "load": 0.0,
                "utilization": 0.0,
                "draining": True,
            },
        ],
        "routers": [
            {"address": "127.0.0.1:7", "leader": True},
            {"address": "127.0.0.1:8", "leader": False},
        ],
        "sessions": [
            {
                "session_id": "abc",
                "tenant": "",
                "model": "windflow-world",
                "state": "streaming",
                "worker": "worker-1",
                "fps": 12.0,
                "level": 2,
                "steps": 2,
                "head_frame": 120,
                "dropped": 0,
            }
        ],
    }
    lines = render(snap).split("\n")
    assert lines[0] == "WORKERS (2)"
    header, first, second = lines[1:4]
    assert header.split() == "ID REGION ADDRESS MODELS SESSIONS LOAD UTIL STATE".split()
    row = "worker-1 eu-west 127.0.0.1:1 windflow-world,wan 1/8 0.12 0.50 serving"
    assert first.split() == row.split()
    assert second.split()[-1] == "draining"
    # columns line up: every row's cells start where the header's do
    assert first.index("eu-west") == header.index("REGION") == second.index("local")
    assert "ROUTERS (2)" in lines
    assert lines[lines.index("ROUTERS (2)") + 2].split() == ["127.0.0.1:7", "leader"]
    assert lines[lines.index("ROUTERS (2)") + 3].split() == ["127.0.0.1:8", "follower"]
    session = lines[lines.index("SESSIONS (1)") + 2].split()
    assert session == "abc - windflow-world streaming worker-1 12 2 2 120 0".split()
    assert all(line == line.rstrip() for line in lines)


def test_render_of_an_empty_mesh() -> None:
    text = render({"workers": [], "routers": [], "sessions": []})
    assert text.split("\n") == [
        "WORKERS (0)",
        "",
        "ROUTERS (0)",
        "(none campaigning: no router replica runs)",
        "",
        "SESSIONS (0)",
    ]


def test_watch_redraws_in_place() -> None:
    first = refresh("a\nbb\n", first=True)
    assert first == f"{CLEAR_SCREEN}a{CLEAR_LINE_END}\nbb{CLEAR_LINE_END}\n{CLEAR_BELOW}"
    later = refresh("a", first=False)
    assert later.startswith(HOME) and CLEAR_SCREEN not in later
    assert later.endswith(CLEAR_BELOW)  # a shorter table leaves nothing of the last one
