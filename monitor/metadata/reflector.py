"""One list+watch of one kind of API object, kept going in a thread of its own.

The protocol, as the API server means it to be used (kopf's watching.py and
the client's watch_recovery example are the models): list, remember the list's
resourceVersion, watch from it with bookmarks (which move the resourceVersion
on without any change), and keep the resourceVersion of every event. A watch
ends for many ordinary reasons (the server's timeout, a dropped connection, a
read timeout on a quiet or slow stream): watch again from the last
resourceVersion. A 410 Gone means that version was compacted away: list again.
Failures back off with jitter. No other call is ever made, and none per object.

A list may be paginated (`limit` and `continue`): the API server then serves
every page from one snapshot, at the first page's resourceVersion, so the pages
together are one consistent list. Each page is handed on item by item before
the next one is fetched, so a consumer that reduces what it is given to a few
fields never holds more than one page of raw objects (a cluster's 10,000 pods
are 50-100 MB of JSON in one response). A continue token that outlives its
snapshot is answered with 410, which lists again from the start, as any 410.

A consumer that reads a few fields may pass its own `decode` for list pages (e.g.
json.loads with an object_pairs_hook that drops the subtrees it never reads as
soon as they are parsed), to keep a page's working set small.

What the objects mean is the consumer's: `replace` gets the whole list (an
iterator, to be consumed in full) and returns how many objects it kept, for the
log; `apply` gets one watch event and says whether anything changed.
`on_change` is called after each list and after each event that changed
something (a bookmark never does).
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

from monitor import log

WATCH_SECONDS = 300  # the server ends each watch after this; we then watch again
READ_TIMEOUT = 90.0  # no byte for this long (bookmarks come every minute): reconnect
CONNECT_TIMEOUT = 10.0

Replace = Callable[[Iterator[dict[str, Any]]], int]
Decode = Callable[[bytes], Any]
Apply = Callable[[str, dict[str, Any]], bool]


class Backoff:
    """Exponential backoff with full jitter: 0.5 s doubling to 30 s."""

    def __init__(self, first: float = 0.5, cap: float = 30.0,
                 rand: Callable[[], float] = random.random) -> None:
        self._first, self._cap, self._rand, self._n = first, cap, rand, 0

    def next(self) -> float:
        delay = min(self._cap, self._first * float(2 ** self._n))
        if delay < self._cap:
            self._n += 1  # no further once capped: 2 ** n would overflow a float in time
        return delay / 2 + self._rand() * delay / 2

    def reset(self) -> None:
        self._n = 0


class _Listing:
    """The items of one (possibly paginated) list, fetched a page at a time as read."""

    def __init__(self, call: Callable[..., Any], kwargs: dict[str, Any], page_size: int | None,
                 decode: Decode = json.loads) -> None:
        self._call, self._kwargs, self._page_size, self._decode = call, kwargs, page_size, decode
        self.resource_version: str | None = None  # the first page's: the snapshot's
        self.pages = 0
        self.items = 0
        self.done = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            kwargs = dict(self._kwargs)
            if self._page_size:
                kwargs["limit"] = self._page_size
            if token:
                kwargs["_continue"] = token
            # Plain JSON, not the client's models: the model refuses objects that do not
            # fit its schema exactly, and building them costs several times the parsing.
            doc = self._decode(self._call(**kwargs).data)
            meta = doc.get("metadata") if isinstance(doc, dict) else None
            meta = meta if isinstance(meta, dict) else {}
            if self.pages == 0:
                self.resource_version = str(meta.get("resourceVersion") or "") or None
            self.pages += 1
            items = [i for i in (doc.get("items") or []) if isinstance(i, dict)]
            del doc  # only the items are kept past here, and each only until it is consumed
            items.reverse()
            while items:
                self.items += 1
                yield items.pop()
            token = str(meta.get("continue") or "") if self._page_size else ""
            if not token:
                self.done = True
                return


class Reflector:
    """Keeps one list+watch of one resource going and hands what it reads on."""

    def __init__(self, list_call: Callable[..., Any], *, resource: str, replace: Replace,
                 apply: Apply, on_change: Callable[[], None] = lambda: None,
                 field_selector: str | None = None, page_size: int | None = None,
                 backoff: Backoff | None = None, watch_seconds: int = WATCH_SECONDS,
                 read_timeout: float = READ_TIMEOUT, logger: Any = None,
                 thread_name: str | None = None, decode: Decode = json.loads) -> None:
        """`list_call` is the client's list function (list_pod_for_all_namespaces, ...),
        which the watch calls too; `page_size` None lists in one response; `decode`
        parses a list page's body."""
        self._list_call, self._resource = list_call, resource
        self._replace, self._apply = replace, apply
        self.on_change = on_change  # may be set later (the daemon wakes its reconciler)
        self._selector, self._page_size, self._decode = field_selector, page_size, decode
        self._backoff = backoff or Backoff()
        self._watch_seconds, self._read_timeout = watch_seconds, read_timeout
        self._log = logger if logger is not None else log.get("reflector").bind(resource=resource)
        self._thread_name = thread_name or resource
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.resource_version: str | None = None
        self.synced = threading.Event()  # the first list is in
        self.lists = 0
        self.pages = 0
        self.watches = 0
        self.errors = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (after stop(); a watch ends at its next event or
        read timeout); True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def run(self) -> None:
        relisted = False  # the last list came from a 410: a second 410 at once backs off
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
                self._backoff.reset()
                relisted = False
            except Exception as exc:  # noqa: BLE001 - every failure means: wait, then go on
                status = getattr(exc, "status", None)
                if status == 410:  # our resourceVersion was compacted away: list again
                    self._log.info("watch expired, listing again",
                                   resource_version=self.resource_version)
                    self.resource_version = None
                    if relisted:
                        self._stop.wait(self._backoff.next())
                    relisted = True
                    continue
                if _is_read_timeout(exc):  # a quiet stream: an ordinary end of a watch
                    continue
                self.errors += 1
                delay = self._backoff.next()
                self._log.warning("kubernetes api call failed",
                                  error=f"{type(exc).__name__}: {exc}", status=status,
                                  retry_in=round(delay, 2))
                self._stop.wait(delay)

    def _selector_args(self) -> dict[str, Any]:
        return {"field_selector": self._selector} if self._selector is not None else {}

    def _list(self) -> None:
        listing = _Listing(self._list_call, {
            **self._selector_args(), "_preload_content": False,
            "_request_timeout": (CONNECT_TIMEOUT, self._read_timeout)}, self._page_size,
            self._decode)
        kept = self._replace(iter(listing))
        self.pages += listing.pages
        if not listing.done:  # a consumer that stops early would leave a partial picture
            raise RuntimeError(f"the {self._resource} list was not read to its end")
        self.resource_version = listing.resource_version
        self.lists += 1
        if not self.synced.is_set():
            self._log.info(f"{self._resource} listed", **{self._resource: kept})
        self.synced.set()
        self.on_change()

    def _watch(self) -> None:
        from kubernetes import watch  # type: ignore[import-untyped]

        # Plain dicts, not the client's models (see _Listing): one odd object would
        # otherwise stop the watch at that event for good. (Any: the client is untyped.)
        make_watch: Any = watch.Watch
        w = make_watch(return_type="object")
        self.watches += 1
        for event in w.stream(self._list_call, **self._selector_args(),
                              resource_version=self.resource_version,
                              allow_watch_bookmarks=True, timeout_seconds=self._watch_seconds,
                              _request_timeout=(CONNECT_TIMEOUT, self._read_timeout)):
            if self._stop.is_set():
                w.stop()
                return
            kind, raw = event.get("type"), event.get("raw_object")
            if not isinstance(raw, dict):
                continue
            version = (raw.get("metadata") or {}).get("resourceVersion")
            if kind in ("ADDED", "MODIFIED", "DELETED") and self._apply(kind, raw):
                self.on_change()
            if isinstance(version, str) and version:
                self.resource_version = version  # bookmarks too: they move it on


def _is_read_timeout(exc: BaseException) -> bool:
    """A read timeout on the watch (urllib3 raises it, sometimes wrapped)."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ in ("ReadTimeoutError", "TimeoutError", "socket.timeout"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
