"""Server messages the worker builds in more than one place."""

from __future__ import annotations

from windflow.common import telemetry
from windflow.errors import WindflowError
from windflow.v1 import windflow_pb2 as pb

# gRPC status numbers by name, for in-stream errors (StreamError.code).
STATUS_NUMBER = {
    "INVALID_ARGUMENT": 3,
    "NOT_FOUND": 5,
    "FAILED_PRECONDITION": 9,
    "OUT_OF_RANGE": 11,
    "RESOURCE_EXHAUSTED": 8,
    "UNAVAILABLE": 14,
    "INTERNAL": 13,
    "DATA_LOSS": 15,
}


def stream_error(
    err: WindflowError, frame_index: int, control: pb.Control | None = None
) -> pb.ServerMessage:
    """An in-stream error; ``control``: the refused control it is about (never applied)."""
    return pb.ServerMessage(
        error=pb.StreamError(
            code=STATUS_NUMBER.get(err.code, 2),
            code_name=err.code,
            message=err.message,
            frame_index=frame_index,
            control=control,
        )
    )


def event(
    kind: pb.SessionEvent.Kind.ValueType, message: str, frame_index: int, steps: int = 0
) -> pb.ServerMessage:
    return pb.ServerMessage(
        event=pb.SessionEvent(kind=kind, message=message, frame_index=frame_index, steps=steps)
    )


def receipt(control: pb.Control) -> pb.ServerMessage:
    """The receipt of an accepted control: taken now, applied from its frame."""
    return pb.ServerMessage(
        receipt=pb.ControlReceipt(
            frame_index=control.frame_index,
            client_time_us=control.client_time_us,
            received_us=telemetry.now_us(),
        )
    )
