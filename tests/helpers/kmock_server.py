"""kmock (an in-memory Kubernetes API emulator) served from a background thread, so that the
synchronous official ``kubernetes`` client can talk to it from test code. No real API server can
run on these machines; this is the stand-in (see docs)."""

from __future__ import annotations

import asyncio
import threading

RESOURCES = ["apps/v1/deployments", "v1/services", "v1/configmaps", "v1/secrets", "v1/persistentvolumeclaims",
             "ray.io/v1/rayjobs", "ray.io/v1/rayclusters"]


class KmockServer:
    def __init__(self) -> None:
        self._ready = threading.Event()
        self.url = ""
        self.emulator = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> "KmockServer":
        import kmock

        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)

            async def main() -> None:
                self._stop = asyncio.Event()
                async with kmock.KubernetesEmulator() as emu, kmock.Server(emu) as server:
                    for r in RESOURCES:
                        emu.resources[r] = {}
                    self.emulator, self.url = emu, str(server.url).rstrip("/")
                    self._ready.set()
                    await self._stop.wait()

            self._loop.run_until_complete(main())

        self._thread = threading.Thread(target=run, name="kmock", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("kmock did not start")
        return self

    def api_client(self):
        from kubernetes import client
        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
