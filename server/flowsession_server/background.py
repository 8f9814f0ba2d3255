"""One background loop of the server (expiry, change feed, retention), started and stopped as a task."""
from __future__ import annotations

import asyncio
from typing import Any, Coroutine


class BackgroundLoop:
    name = "flowsession-loop"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _spawn(self, loop: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        self._task = asyncio.create_task(loop, name=self.name)
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
