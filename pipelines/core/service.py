"""A process (or group of processes) this program starts and stops, usable as a context manager.

    class Server(Service):
        def start(self) -> None: ...
        def stop(self) -> None: ...   # must cope with a half-done start()

    with Server() as server:          # a start() that fails stops what it had started, then raises
        ...
"""

from __future__ import annotations

import abc
from typing import TypeVar

S = TypeVar("S", bound="Service")


class Service(abc.ABC):
    @abc.abstractmethod
    def start(self) -> None:
        """Start it and wait until it is ready."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop whatever start() started, however far it got."""

    def __enter__(self: S) -> S:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
