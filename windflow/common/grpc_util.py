"""gRPC plumbing shared by all services: one error interceptor, server and channel setup.

Servicers raise ``windflow.errors.WindflowError`` subclasses; ``ErrorInterceptor`` is the
one place they become gRPC statuses. Every server gets health checking and reflection.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import etcd3aio.errors
import grpc
import nats.errors
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from windflow.errors import Unavailable, WindflowError

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # internal hops carry raw frames
PUBLIC_MAX_MESSAGE_BYTES = 1024 * 1024
"""The largest message the gateway accepts from a client (by default), and the largest the
SDK sends: an oversize message fails its own call in the client, before it takes any of
the connection's flow-control window that the client's other streams share."""
RETRY_AFTER_KEY = "windflow-retry-after-ms"

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def status_code(err: WindflowError) -> grpc.StatusCode:
    return grpc.StatusCode[err.code]


def trailing_metadata(err: WindflowError) -> tuple[tuple[str, str], ...]:
    if err.retry_after_s is None:
        return ()
    return ((RETRY_AFTER_KEY, str(round(err.retry_after_s * 1000))),)


DEPENDENCY_DOWN: tuple[type[BaseException], ...] = (
    etcd3aio.errors.EtcdConnectionError,
    etcd3aio.errors.EtcdTransientError,
    nats.errors.Error,
)
"""Client errors of etcd and NATS that mean "not reachable now" (a restart, a partition):
UNAVAILABLE with a retry hint, which callers retry, never INTERNAL, which ends a stream."""


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, DEPENDENCY_DOWN) and not isinstance(exc, WindflowError):
        log.warning("%s: a dependency is unreachable: %s: %s", method, type(exc).__name__, exc)
        exc = Unavailable(
            f"a dependency is unreachable: {type(exc).__name__}: {exc}", retry_after_s=0.5
        )
    if isinstance(exc, WindflowError):
        await context.abort(status_code(exc), exc.message, trailing_metadata(exc))
    log.exception("unhandled error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps WindflowError (and stray exceptions) to gRPC statuses, for every method kind."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await unary(request, context)
                except (WindflowError, Exception) as exc:
                    if _is_abort(exc):
                        raise
                    await _abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            server_streaming = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                try:
                    async for response in server_streaming(request, context):
                        yield response
                except (WindflowError, Exception) as exc:
                    if _is_abort(exc):
                        raise
                    await _abort(context, exc, method)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            streaming = handler.stream_stream

            async def stream_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                try:
                    async for response in streaming(requests, context):
                        yield response
                except (WindflowError, Exception) as exc:
                    if _is_abort(exc):
                        raise
                    await _abort(context, exc, method)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises grpc.aio.AbortError; it must pass through untouched.
    return isinstance(exc, grpc.aio.AbortError)


class ServiceServer:
    """A grpc.aio server with health, reflection and the error interceptor.

    Lifecycle: construct -> ``add(register_fn, servicer, service_name)`` for each service
    -> ``await start()`` -> ``await set_serving()`` once dependencies are ready ->
    ``await aclose(grace)``.
    """

    def __init__(self, listen: str, *, max_receive_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor()],
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", max_receive_bytes),
                ("grpc.so_reuseport", 0),
                # accept our channels' keep-alive pings (CHANNEL_OPTIONS): by default a
                # server answers pings more often than every 5 min with GOAWAY
                # "too_many_pings", which tears down every stream on the connection
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = [
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        ]
        self._listen = listen
        self.port = 0
        self._closed = False

    def add(
        self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any, name: str
    ) -> None:
        register(servicer, self.server)
        self._service_names.append(name)

    async def start(self) -> str:
        reflection.enable_server_reflection(
            [*self._service_names, reflection.SERVICE_NAME], self.server
        )
        self.port = self.server.add_insecure_port(self._listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self._listen}")
        await self.server.start()
        host = self._listen.rsplit(":", 1)[0]
        for name in ("", *self._service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        return f"{host}:{self.port}"

    async def set_serving(self, names: Iterable[str] = ()) -> None:
        for name in ("", *self._service_names, *names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    async def set_not_serving(self) -> None:
        """Health checks answer NOT_SERVING from now on (a drain before ``aclose``)."""
        await self.health.enter_graceful_shutdown()

    async def aclose(self, grace: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def channel(
    address: str,
    *,
    max_send_bytes: int = MAX_MESSAGE_BYTES,
    extra_options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An insecure channel with ``CHANNEL_OPTIONS``, sending at most ``max_send_bytes``
    per message; ``extra_options`` are added (or replace those of the same name)."""
    replaced = {"grpc.max_send_message_length", *(name for name, _ in extra_options)}
    options = [o for o in CHANNEL_OPTIONS if o[0] not in replaced]
    return grpc.aio.insecure_channel(
        dial_target(address),
        options=[("grpc.max_send_message_length", max_send_bytes), *options, *extra_options],
    )


class Channels:
    """Channels by address, each made once on first use (``channel``) and closed together
    by ``aclose``: a service's connections to its peers."""

    def __init__(self) -> None:
        self._open: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        found = self._open.get(address)
        if found is None:
            found = self._open[address] = channel(address)
        return found

    async def aclose(self) -> None:
        open_, self._open = self._open, {}
        for each in open_.values():
            await each.close()


def dial_target(address: str) -> str:
    """The gRPC target for ``address``: one ``host:port``, or several comma-separated
    (replicas of a service, e.g. the routers: IP literals), which gRPC's default
    pick_first policy tries in order and fails over between when one goes away."""
    parts = [part.strip() for part in address.split(",") if part.strip()]
    if len(parts) <= 1:
        return address
    return "ipv4:" + ",".join(parts)


async def call(awaitable: Awaitable[T]) -> T:
    """Await a downstream RPC, turning its failure into the matching typed error."""
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from exc


def error_from_rpc(exc: grpc.aio.AioRpcError) -> WindflowError:
    """Turn a downstream RPC failure back into the matching typed error (same code)."""
    retry_after = None
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            retry_after = int(value) / 1000.0
    return error_from_status(
        exc.code().name, exc.details() or exc.code().name, retry_after_s=retry_after
    )


def error_from_status(
    code_name: str, message: str, *, retry_after_s: float | None = None
) -> WindflowError:
    """The typed error of a gRPC status code's name (an RPC's, or an in-stream
    ``StreamError.code_name``); UNAVAILABLE for a code without one."""
    from windflow import errors

    by_code: dict[str, type[WindflowError]] = {
        cls.code: cls
        for cls in (
            errors.InvalidArgument,
            errors.NotFound,
            errors.AlreadyExists,
            errors.OutOfRange,
            errors.FailedPrecondition,
            errors.ResourceExhausted,
            errors.Unavailable,
            errors.Unauthenticated,
            errors.PermissionDenied,
            errors.DataLoss,
            errors.Internal,
        )
    }
    return by_code.get(code_name, errors.Unavailable)(message, retry_after_s=retry_after_s)
