"""Gymnasium environments over the mesh: a world model served by Windflow as an RL env.

``WindflowEnv`` is one lockstep session (docs/simulation.md) behind the synchronous Gym
API: ``reset(seed=s)`` creates a session of the model with seed ``s`` and returns its
frame 0 (made with the noop action); ``step(a)`` sends the control stamped for the next
frame and returns that frame. The session makes a frame as soon as its control is in, so
an episode runs as fast as the worker steps it; and the same seed and actions give the
same frames, bit for bit (what ``gymnasium.utils.env_checker.check_env``'s determinism
checks need). A world model has no reward and no end: ``reward(obs, action, info)`` and
``terminated(obs, info)`` are hooks (default 0.0 and False), and ``max_episode_steps``
truncates. ``arena_target_reward`` and ``arena_reached`` are such hooks for the built-in
arena (``windflow-world``, docs/world_model.md).

``WindflowVectorEnv`` steps N sessions at once: every control is sent, then every frame
awaited, so the worker batches them; it resets an env that ended on the next ``step``
(gymnasium's ``AutoresetMode.NEXT_STEP``).

The SDK is asyncio; the Gym API is not. Every env of a process runs its coroutines on one
event loop in a daemon thread (``run_sync``); the hooks run in the caller's thread.

    env = WindflowEnv(gateway="127.0.0.1:PORT", token=TOKEN, max_episode_steps=200,
                      reward=arena_target_reward((48, 16)))
    obs, info = env.reset(seed=7)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

``gymnasium.make("windflow.env:Windflow-v0", gateway=...)`` and ``gymnasium.make_vec(
"windflow.env:Windflow-v0", num_envs=8, vectorization_mode="vector_entry_point",
gateway=...)`` make the same envs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from windflow.errors import FailedPrecondition, NotFound, ResourceExhausted, WindflowError
from windflow.sdk import Client, Session, SessionStreamError
from windflow.v1 import windflow_pb2 as pb

T = TypeVar("T")

Obs = np.ndarray
RewardFn = Callable[[Obs, Any, dict[str, Any]], float]
"""``reward(obs, action, info)``: the reward of the step that made ``obs``."""
TerminatedFn = Callable[[Obs, dict[str, Any]], bool]
"""``terminated(obs, info)``: whether ``obs`` ends the episode."""

DEFAULT_MODEL = "windflow-world"
STEP_TIMEOUT_S = 30.0
"""How long a step waits for its frame (a worker that never answers raises TimeoutError)."""
CREATE_TIMEOUT_S = 60.0
"""How long a reset retries a session creation refused by the tenant's creation rate."""
SEED_RANGE = 2**31
"""An unseeded reset draws the session's seed from [0, SEED_RANGE) with the env's RNG."""


# ---- one event loop for every env of the process ----

_loop: asyncio.AbstractEventLoop | None = None
_loop_thread: threading.Thread | None = None
_loop_pid = 0
_loop_lock = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    """The process's env loop, running in a daemon thread (started on first use; a
    forked child starts its own)."""
    global _loop, _loop_thread, _loop_pid
    with _loop_lock:
        if _loop is None or _loop_pid != os.getpid() or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="windflow-env-loop", daemon=True
            )
            thread.start()
            _loop, _loop_thread, _loop_pid = loop, thread, os.getpid()
        return _loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the env loop and wait for its result (from any other thread)."""
    loop = background_loop()
    if threading.current_thread() is _loop_thread:
        coro.close()
        raise RuntimeError("a Windflow env was called from its own event loop's thread")
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


# ---- the built-in arena's hooks ----

ARENA_SIZE = 64
"""The built-in arena's side in pixels (``services/worker/models/world/sim.py``)."""


def agent_centroid(obs: Obs) -> tuple[float, float] | None:
    """The red agent's centroid (x, y) in the arena's pixels (0..64, whatever the
    observation's size), or None when it is not in sight. Agent pixels: r > 150, g < 90,
    b < 90 (its colour is (232, 64, 56); the balls', obstacles' and background's fail)."""
    red = (obs[..., 0] > 150) & (obs[..., 1] < 90) & (obs[..., 2] < 90)
    ys, xs = np.nonzero(red)
    if len(xs) == 0:
        return None
    height, width = obs.shape[:2]
    # a pixel's centre is at +0.5
    x = (float(xs.mean()) + 0.5) * ARENA_SIZE / width
    y = (float(ys.mean()) + 0.5) * ARENA_SIZE / height
    return x, y


def arena_target_reward(target: tuple[float, float]) -> RewardFn:
    """A reward for ``windflow-world``: minus the distance from the agent's centroid to
    ``target`` (x, y in the arena's pixels), over the arena's diagonal: in [-1, 0], 0 on
    the target; -1 when the agent is not in sight."""
    tx, ty = float(target[0]), float(target[1])
    diagonal = math.hypot(ARENA_SIZE, ARENA_SIZE)

    def reward(obs: Obs, action: Any, info: dict[str, Any]) -> float:
        at = agent_centroid(obs)
        if at is None:
            return -1.0
        return -math.hypot(at[0] - tx, at[1] - ty) / diagonal

    return reward


def arena_reached(target: tuple[float, float], radius: float = 4.0) -> TerminatedFn:
    """A termination for ``windflow-world``: the agent's centroid is within ``radius``
    pixels of ``target`` (x, y in the arena's pixels)."""
    tx, ty = float(target[0]), float(target[1])

    def terminated(obs: Obs, info: dict[str, Any]) -> bool:
        at = agent_centroid(obs)
        return at is not None and math.hypot(at[0] - tx, at[1] - ty) <= radius

    return terminated


# ---- spaces ----


def action_space_of(model: pb.ModelInfo) -> spaces.Space[Any]:
    """Discrete(len(actions)); with axes, Dict(action=Discrete, axes=Box(-1, 1))."""
    discrete = spaces.Discrete(len(model.actions))
    if not model.axes:
        return discrete
    axes = spaces.Box(-1.0, 1.0, shape=(len(model.axes),), dtype=np.float32)
    return spaces.Dict({"action": discrete, "axes": axes})


def observation_space_of(width: int, height: int) -> spaces.Box:
    return spaces.Box(0, 255, shape=(height, width, 3), dtype=np.uint8)


def _control(space: spaces.Space[Any], action: Any) -> tuple[int, tuple[float, ...]]:
    """``action`` as (action, axes), or gymnasium.error.InvalidAction when it is outside
    ``space``."""
    try:
        inside = space.contains(action)
    except (TypeError, ValueError, AttributeError):
        inside = False
    if not inside:
        raise gymnasium.error.InvalidAction(
            f"action {action!r} is outside the action space {space}"
        )
    if isinstance(space, spaces.Dict):
        axes = tuple(float(v) for v in np.asarray(action["axes"]).reshape(-1))
        return int(action["action"]), axes
    return int(action), ()


async def _model(client: Client, model_id: str) -> pb.ModelInfo:
    models = await client.list_models()
    for model in models:
        if model.model_id == model_id:
            return model
    served = ", ".join(m.model_id for m in models) or "none"
    raise NotFound(f"the mesh serves no model {model_id!r} (served: {served})")


# ---- one episode: a lockstep session and its stream ----


class _Refusals(collections.deque[pb.StreamError]):
    """``Session.errors`` that also tells the episode (an error is not a frame: the stream
    yields nothing for it)."""

    def __init__(self, notify: Callable[[pb.StreamError], None]) -> None:
        super().__init__(maxlen=256)
        self._notify = notify

    def append(self, item: pb.StreamError) -> None:
        super().append(item)
        self._notify(item)


class _Episode:
    """A lockstep session, its stream and the frames read from it (on the env loop)."""

    def __init__(
        self,
        client: Client,
        info: pb.Session,
        live: Session,
        timeout_s: float,
        batch_sizes: collections.Counter[int],
    ) -> None:
        self.client = client
        self.batch_sizes = batch_sizes
        """Frames by the size of the worker's batch that made them (shared by an env's
        episodes)."""
        self.info = info
        self.live = live
        self.timeout_s = timeout_s
        self.next_index = 0
        """The frame the next control is for."""
        self._frames: dict[int, pb.Frame] = {}
        self._refused: list[pb.StreamError] = []
        self._changed = asyncio.Event()
        self._ended = False
        self._failure: BaseException | None = None
        live.errors = _Refusals(self._on_error)
        self._pump = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls,
        client: Client,
        model: pb.ModelInfo,
        seed: int,
        *,
        width: int,
        height: int,
        steps: int,
        first_action: int,
        timeout_s: float,
        batch_sizes: collections.Counter[int],
    ) -> tuple[_Episode, np.ndarray]:
        """A new session of ``model`` with ``seed``, attached with the control for frame 0;
        returns it with frame 0."""
        info = await _create(
            client,
            model.model_id,
            seed=seed,
            format="rgb",
            width=width,
            height=height,
            steps=steps,
            session_class="lockstep",
        )
        try:
            live = await client.attach(info, controls=[(0, first_action)])
        except BaseException:
            with contextlib.suppress(WindflowError):
                await client.close_session(info.session_id)
            raise
        episode = cls(client, info, live, timeout_s, batch_sizes)
        try:
            frame = await episode.frame(0)
        except BaseException:
            await episode.close()
            raise
        return episode, frame

    def _on_error(self, error: pb.StreamError) -> None:
        self._refused.append(error)
        self._changed.set()

    async def _read(self) -> None:
        try:
            async for received in self.live.frames():
                self._frames[received.index] = received.frame
                self.batch_sizes[received.frame.latency.batch_size] += 1
                self._changed.set()
        except Exception as exc:  # (given to the step that waits)
            self._failure = exc
        finally:
            self._ended = True
            self._changed.set()

    async def send(self, action: int, axes: Sequence[float] = ()) -> int:
        """The control for the next frame; returns that frame's index."""
        index = self.next_index
        await self.live.send(action=action, axes=axes, frame_index=index)
        return index

    async def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as uint8 (H, W, 3), once it is here; the control for it refused
        raises gymnasium.error.InvalidAction (INVALID_ARGUMENT) or SessionStreamError."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            frame = self._frames.pop(index, None)
            if frame is not None:
                self.next_index = index + 1
                # a copy the caller owns (the message's bytes are read-only)
                return (
                    np.frombuffer(frame.data, dtype=np.uint8)
                    .reshape(frame.height, frame.width, 3)
                    .copy()
                )
            if self._refused:
                error = self._refused.pop(0)
                if error.code_name == "INVALID_ARGUMENT":
                    raise gymnasium.error.InvalidAction(
                        f"session {self.info.session_id} refused the control for frame "
                        f"{index}: {error.message}"
                    )
                raise SessionStreamError(error)
            if self._ended:
                if self._failure is not None:
                    raise self._failure
                raise FailedPrecondition(
                    f"the stream of session {self.info.session_id} ended before frame {index}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"no frame {index} of session {self.info.session_id} in {self.timeout_s:g} s"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def close(self) -> None:
        """Close the stream and the session (errors closing it are ignored)."""
        await self.live.aclose()
        # (the read ends with the call, cancelled: its task may end cancelled too)
        await asyncio.wait({self._pump}, timeout=5.0)
        if not self._pump.done():
            self._pump.cancel()
            await asyncio.wait({self._pump})
        with contextlib.suppress(WindflowError):
            await self.client.close_session(self.info.session_id)


async def _create(client: Client, model_id: str, **spec: Any) -> pb.Session:
    """CreateSession, retried for ``CREATE_TIMEOUT_S`` while refused with a retry-after
    hint (the server's word that it may pass: the tenant's creation rate, a worker's
    headroom until its next update); any other refusal is raised at once."""
    deadline = time.monotonic() + CREATE_TIMEOUT_S
    while True:
        try:
            return await client.create_session(model_id, **spec)
        except ResourceExhausted as err:
            if not err.retry_after_s or time.monotonic() > deadline:
                raise
            await asyncio.sleep(min(err.retry_after_s, 0.5))


def _first_action(model: pb.ModelInfo) -> int:
    """The action that makes frame 0: noop where the model has one, else action 0."""
    return list(model.actions).index("noop") if "noop" in model.actions else 0


def _spec_size(model: pb.ModelInfo, width: int, height: int) -> tuple[int, int]:
    if (width == 0) != (height == 0):
        raise ValueError("give both width and height, or neither")
    return (width or model.width, height or model.height)


# ---- the single env ----


class _MeshEnv:
    """What a Windflow environment, single or vector, keeps of its configuration, and its
    client of the mesh (made on first use)."""

    def __init__(
        self,
        model: str,
        gateway: str | Sequence[str],
        token: str | None,
        reward: RewardFn | None,
        terminated: TerminatedFn | None,
        max_episode_steps: int | None,
        steps: int,
        render_mode: str | None,
        step_timeout_s: float,
        render_modes: Sequence[str],
    ) -> None:
        if render_mode is not None and render_mode not in render_modes:
            raise ValueError(f"render_mode must be None or one of {list(render_modes)}")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError("max_episode_steps must be >= 1 or None")
        self.model_id = model
        self.gateway = gateway
        self.token = token
        self.reward_fn = reward
        self.terminated_fn = terminated
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        self.step_timeout_s = step_timeout_s
        self._steps = steps
        self._client: Client | None = None
        self.frames_by_batch_size: collections.Counter[int] = collections.Counter()
        """Frames received, by the size of the worker batch that made each (diagnostics:
        how well the worker batched the steps)."""

    async def _connect(self) -> pb.ModelInfo:
        if self._client is None:
            self._client = Client(self.gateway, token=self.token)
        return await _model(self._client, self.model_id)


class WindflowEnv(_MeshEnv, gymnasium.Env[np.ndarray, Any]):
    """One lockstep session of ``model`` on the mesh behind ``gateway`` as a Gym env.

    ``gateway``: one address, several (a sequence or "HOST:PORT,HOST:PORT"; the stream
    resumes through the next when one goes away). ``token``: the session token (default:
    $WINDFLOW_TOKEN). ``reward`` / ``terminated``: hooks (default 0.0 / False);
    ``max_episode_steps``: steps after which an episode is truncated (None: never).
    ``width``/``height``: the frames' size (0: the model's native size); ``steps``: the
    denoising steps (0: the model's default). ``render_mode``: None or "rgb_array" (the
    last frame). ``step_timeout_s``: how long a step waits for its frame.

    ``reset`` info: ``session_id``, ``seed``, ``frame_index`` (0); ``step`` info:
    ``frame_index`` (no session id, so the same seed and actions give equal infos).
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 24}

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        gateway: str | Sequence[str] = "127.0.0.1:50051",
        token: str | None = None,
        *,
        reward: RewardFn | None = None,
        terminated: TerminatedFn | None = None,
        max_episode_steps: int | None = None,
        width: int = 0,
        height: int = 0,
        steps: int = 0,
        render_mode: str | None = None,
        step_timeout_s: float = STEP_TIMEOUT_S,
    ) -> None:
        _MeshEnv.__init__(
            self, model, gateway, token, reward, terminated, max_episode_steps, steps,
            render_mode, step_timeout_s, self.metadata["render_modes"],
        )  # fmt: skip
        self._episode: _Episode | None = None
        try:
            self.model: pb.ModelInfo = run_sync(self._connect())
        except BaseException:
            run_sync(self._close())
            raise
        self.width, self.height = _spec_size(self.model, width, height)
        self.metadata = {**self.metadata, "render_fps": self.model.fps}
        self.action_space = action_space_of(self.model)
        self.observation_space = observation_space_of(self.width, self.height)
        self._last: np.ndarray | None = None
        self._elapsed = 0
        self._done = True
        """No episode to step: before the first reset, or after one ended."""

    @property
    def session_id(self) -> str | None:
        """The current episode's session (None before the first reset or after close)."""
        return self._episode.info.session_id if self._episode is not None else None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Close the last episode's session and start one with ``seed`` (None: drawn from
        the env's RNG, which ``reset(seed=...)`` seeds); returns frame 0."""
        super().reset(seed=seed)
        session_seed = seed if seed is not None else int(self.np_random.integers(SEED_RANGE))
        obs = run_sync(self._reset(session_seed))
        self._last, self._elapsed, self._done = obs, 0, False
        info = {"session_id": self.session_id, "seed": session_seed, "frame_index": 0}
        return obs.copy(), info

    async def _reset(self, seed: int) -> np.ndarray:
        await self._close_episode()
        await self._connect()
        assert self._client is not None
        self._episode, obs = await _Episode.open(
            self._client,
            self.model,
            seed,
            width=self.width,
            height=self.height,
            steps=self._steps,
            first_action=_first_action(self.model),
            timeout_s=self.step_timeout_s,
            batch_sizes=self.frames_by_batch_size,
        )
        return obs

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._done or self._episode is None:
            raise gymnasium.error.ResetNeeded(
                "the episode has ended (or never began): call reset() before step()"
            )
        index, axes = _control(self.action_space, action)
        obs = run_sync(_step(self._episode, index, axes))
        self._last = obs
        self._elapsed += 1
        info: dict[str, Any] = {"frame_index": self._episode.next_index - 1}
        reward = float(self.reward_fn(obs, action, info)) if self.reward_fn else 0.0
        terminated = bool(self.terminated_fn(obs, info)) if self.terminated_fn else False
        truncated = self.max_episode_steps is not None and self._elapsed >= self.max_episode_steps
        self._done = terminated or truncated
        return obs.copy(), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        if self._last is None:
            raise gymnasium.error.ResetNeeded("render() before reset()")
        return self._last.copy()

    async def _close_episode(self) -> None:
        episode, self._episode = self._episode, None
        if episode is not None:
            await episode.close()

    async def _close(self) -> None:
        await self._close_episode()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def close(self) -> None:
        """Close the session and the connection (again: nothing); a later reset opens both."""
        if self._client is not None or self._episode is not None:
            run_sync(self._close())
        self._done = True


async def _raise(error: BaseException) -> np.ndarray:
    raise error


async def _step(episode: _Episode, action: int, axes: Sequence[float]) -> np.ndarray:
    index = await episode.send(action, axes)
    return await episode.frame(index)


# ---- the vector env ----


class WindflowVectorEnv(_MeshEnv, VectorEnv[np.ndarray, Any, np.ndarray]):
    """``num_envs`` lockstep sessions of ``model`` stepped together over one connection.

    ``step(actions)`` sends every env's control, then awaits every frame (concurrently: the
    worker batches them). An env that terminated or truncated is reset on the next
    ``step`` (``AutoresetMode.NEXT_STEP``): that call returns its frame 0 with reward 0
    and terminated/truncated False, and ignores its action. ``reset(seed=s)`` seeds env i
    with ``s + i`` (a list: one seed each; None: drawn from each env's RNG). Env i given
    seed s and the same actions makes the same frames as ``WindflowEnv`` reset with s.
    The other arguments are ``WindflowEnv``'s.
    """

    metadata: dict[str, Any] = {
        "render_modes": ["rgb_array"],
        "render_fps": 24,
        "autoreset_mode": AutoresetMode.NEXT_STEP,
    }

    def __init__(
        self,
        num_envs: int,
        model: str = DEFAULT_MODEL,
        gateway: str | Sequence[str] = "127.0.0.1:50051",
        token: str | None = None,
        *,
        reward: RewardFn | None = None,
        terminated: TerminatedFn | None = None,
        max_episode_steps: int | None = None,
        width: int = 0,
        height: int = 0,
        steps: int = 0,
        render_mode: str | None = None,
        step_timeout_s: float = STEP_TIMEOUT_S,
    ) -> None:
        if num_envs < 1:
            raise ValueError("num_envs must be >= 1")
        _MeshEnv.__init__(
            self, model, gateway, token, reward, terminated, max_episode_steps, steps,
            render_mode, step_timeout_s, self.metadata["render_modes"],
        )  # fmt: skip
        self.num_envs = num_envs
        self._episodes: list[_Episode | None] = [None] * num_envs
        try:
            self.model: pb.ModelInfo = run_sync(self._connect())
        except BaseException:
            run_sync(self._close())
            raise
        self.width, self.height = _spec_size(self.model, width, height)
        self.metadata = {**self.metadata, "render_fps": self.model.fps}
        self.single_action_space = action_space_of(self.model)
        self.single_observation_space = observation_space_of(self.width, self.height)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._rngs: list[np.random.Generator] = [seeding.np_random()[0] for _ in range(num_envs)]
        self._last = np.zeros((num_envs, self.height, self.width, 3), dtype=np.uint8)
        self._elapsed = np.zeros(num_envs, dtype=np.int64)
        self._autoreset = np.zeros(num_envs, dtype=np.bool_)
        self._started = False

    @property
    def session_ids(self) -> list[str | None]:
        return [e.info.session_id if e is not None else None for e in self._episodes]

    def _seeds(self, seed: int | Sequence[int | None] | None) -> list[int | None]:
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, int | np.integer):
            return [int(seed) + i for i in range(self.num_envs)]
        seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"give {self.num_envs} seeds, got {len(seeds)}")
        return seeds

    def _session_seed(self, i: int, seed: int | None) -> int:
        if seed is not None:
            self._rngs[i] = seeding.np_random(seed)[0]
            return seed
        return int(self._rngs[i].integers(SEED_RANGE))

    def reset(
        self,
        *,
        seed: int | Sequence[int | None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every env (``options["reset_mask"]``: those it marks); returns the
        batched frames 0 (the others' last frames) and their infos."""
        if isinstance(seed, int | np.integer):
            self._np_random, self._np_random_seed = seeding.np_random(int(seed))
        seeds = self._seeds(seed)
        mask = np.ones(self.num_envs, dtype=np.bool_)
        if options is not None and "reset_mask" in options:
            mask = np.asarray(options["reset_mask"], dtype=np.bool_)
            if mask.shape != (self.num_envs,):
                raise ValueError(f"reset_mask must have shape ({self.num_envs},)")
        chosen = [i for i in range(self.num_envs) if mask[i]]
        session_seeds = {i: self._session_seed(i, seeds[i]) for i in chosen}
        frames = run_sync(self._reset_some(session_seeds))
        infos: dict[str, Any] = {}
        for i in chosen:
            self._last[i] = frames[i]
            self._elapsed[i] = 0
            self._autoreset[i] = False
            infos = self._add_info(infos, self._reset_info(i, session_seeds[i]), i)
        self._started = True
        return self._last.copy(), infos

    def _reset_info(self, i: int, seed: int) -> dict[str, Any]:
        episode = self._episodes[i]
        assert episode is not None
        return {"session_id": episode.info.session_id, "seed": seed, "frame_index": 0}

    async def _reopen(self, i: int, seed: int) -> np.ndarray:
        old, self._episodes[i] = self._episodes[i], None
        if old is not None:
            await old.close()
        assert self._client is not None
        self._episodes[i], obs = await _Episode.open(
            self._client,
            self.model,
            seed,
            width=self.width,
            height=self.height,
            steps=self._steps,
            first_action=_first_action(self.model),
            timeout_s=self.step_timeout_s,
            batch_sizes=self.frames_by_batch_size,
        )
        return obs

    async def _reset_some(self, seeds: dict[int, int]) -> dict[int, np.ndarray]:
        """Every env of ``seeds`` reopened, all of it to its end before the first failure
        (if any) is raised."""
        await self._connect()
        frames = await asyncio.gather(
            *(self._reopen(i, s) for i, s in seeds.items()), return_exceptions=True
        )
        out: dict[int, np.ndarray] = {}
        for i, outcome in zip(seeds, frames, strict=True):
            if isinstance(outcome, BaseException):
                raise outcome
            out[i] = outcome
        return out

    def step(
        self, actions: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if not self._started:
            raise gymnasium.error.ResetNeeded("call reset() before step()")
        singles = list(gymnasium.vector.utils.iterate(self.action_space, actions))
        if len(singles) != self.num_envs:
            raise gymnasium.error.InvalidAction(f"give {self.num_envs} actions, got {len(singles)}")
        resets = {
            i: self._session_seed(i, None) for i in range(self.num_envs) if self._autoreset[i]
        }
        controls = {
            i: _control(self.single_action_space, singles[i])
            for i in range(self.num_envs)
            if i not in resets
        }
        frames = run_sync(self._step_all(controls, resets))
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminations = np.zeros(self.num_envs, dtype=np.bool_)
        truncations = np.zeros(self.num_envs, dtype=np.bool_)
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            obs = frames[i]
            self._last[i] = obs
            if i in resets:
                self._elapsed[i] = 0
                infos = self._add_info(infos, self._reset_info(i, resets[i]), i)
                continue
            episode = self._episodes[i]
            assert episode is not None
            info: dict[str, Any] = {"frame_index": episode.next_index - 1}
            self._elapsed[i] += 1
            if self.reward_fn is not None:
                rewards[i] = float(self.reward_fn(obs, singles[i], info))
            if self.terminated_fn is not None:
                terminations[i] = bool(self.terminated_fn(obs, info))
            if self.max_episode_steps is not None:
                truncations[i] = self._elapsed[i] >= self.max_episode_steps
            infos = self._add_info(infos, info, i)
        self._autoreset = terminations | truncations
        return self._last.copy(), rewards, terminations, truncations, infos

    async def _step_all(
        self, controls: dict[int, tuple[int, tuple[float, ...]]], resets: dict[int, int]
    ) -> dict[int, np.ndarray]:
        """Every control sent, then every frame awaited, the resets alongside. All of it
        runs to its end before the first failure (if any) is raised, so that no env is
        left half-stepped."""
        episodes: dict[int, _Episode] = {}
        for i in controls:
            episode = self._episodes[i]
            assert episode is not None, "a failed reset: call reset()"
            episodes[i] = episode

        async def stepped() -> list[np.ndarray | BaseException]:
            sent = await asyncio.gather(
                *(e.send(*controls[i]) for i, e in episodes.items()), return_exceptions=True
            )
            return await asyncio.gather(
                *(
                    e.frame(index) if isinstance(index, int) else _raise(index)
                    for e, index in zip(episodes.values(), sent, strict=True)
                ),
                return_exceptions=True,
            )

        frames, fresh = await asyncio.gather(
            stepped(),
            asyncio.gather(
                *(self._reopen(i, s) for i, s in resets.items()), return_exceptions=True
            ),
        )
        out: dict[int, np.ndarray] = {}
        for i, outcome in [*zip(episodes, frames, strict=True), *zip(resets, fresh, strict=True)]:
            if isinstance(outcome, BaseException):
                raise outcome
            out[i] = outcome
        return out

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode != "rgb_array":
            return None
        return tuple(frame.copy() for frame in self._last)

    async def _close(self) -> None:
        episodes, self._episodes = self._episodes, [None] * self.num_envs
        await asyncio.gather(*(e.close() for e in episodes if e is not None))
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def close_extras(self, **kwargs: Any) -> None:
        run_sync(self._close())
        self._started = False


gymnasium.register(
    id="Windflow-v0",
    entry_point="windflow.env:WindflowEnv",
    vector_entry_point="windflow.env:WindflowVectorEnv",
)
"""``gymnasium.make("windflow.env:Windflow-v0", gateway=...)`` (the module prefix
imports this module first)."""
