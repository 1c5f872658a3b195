"""The Windflow Python SDK (asyncio).

async with Client("127.0.0.1:50051") as client:
    async with client.session("windflow-world", seed=7) as session:
        await session.send(action=1)
        async for frame in session.frames(limit=100):
            image = frame.rgb()          # numpy uint8 (H, W, 3)
            await session.send(action=2)  # applies to the next frame
"""

from windflow.sdk.client import Client, ReceivedFrame, Session, SessionStreamError

__all__ = ["Client", "ReceivedFrame", "Session", "SessionStreamError"]
