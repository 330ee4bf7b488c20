"""Which model version the transformer serves, and the switch to a newer (or older) one.

The transformer reads the same model base path as TF Serving: every version
folder holds the SavedModel and the bundle fitted on it (``bundle.py``). The
*active* version is the newest one that

1. has a bundle here that verifies (sha256 of every file, the SavedModel's
   fingerprint, library versions), loaded exactly as at start-up, and
2. TF Serving reports ``AVAILABLE``, with metadata that fits that bundle.

Every predict call is pinned to the active version's number, so what TF Serving
loads never changes what an answer means. A request holds the version it
started with until it is answered; the switch is one assignment, so requests in
flight finish on their version and new ones start on the new one. With TF
Serving's version policy keeping the previous version loaded (the manifests
use ``latest { num_versions: 2 }``), an update needs no gap at all.

When no version satisfies both, readiness is false and requests get 503 with a
message naming what the transformer has and what TF Serving serves. A bundle
that fails verification is skipped with an error log line (and a metric); it
is tried again only when its files change.

3. Its interface (features by name and order, top-k, segments, item id type:
   ``interface.py``) is the one the transformer serves: the active version's,
   or before any is active the one recorded beside the version folders
   (``interface.json``). A version that would change it is refused, with one
   log line naming every difference and a metric, and the transformer keeps
   serving (and stays ready): anything written into the store, a plain
   ``model.train`` or a copy by hand, cannot break the clients of a running
   transformer, nor of one started after it. A deliberate change is served
   under a new model name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

from transformer.store.bundle import Bundle, BundleError, bundle_dir, load_bundle, model_versions
from transformer.store.interface import Interface, InterfaceFileError, differences, read_interface
from transformer.steps.kernels import UnsupportedEstimator
from transformer.pipeline import Pipeline
from transformer.predictor import PredictorClient, PredictorError, metadata_problems

log = logging.getLogger("transformer")

Outputs = dict[str, np.ndarray]


class NoServableVersion(PredictorError):
    """No model version is both loaded here and served by TF Serving (answered 503)."""

    def __init__(self, message: str):
        super().__init__(503, message, "no_servable_version")


@dataclass(frozen=True)
class ServedVersion:
    """One model version, ready to answer: its pipeline, its pinned (coalesced) predictor call and
    the metrics that depend on the version (feature ranges, segment mix)."""

    pipeline: Pipeline
    forward: Callable[[np.ndarray], Awaitable[Outputs]]
    metrics: Any = None
    interface: Interface | None = None  # what its clients send and get back (None: not checked)

    @property
    def version(self) -> int:
        return self.pipeline.version


def _files_stamp(version_dir: Path) -> tuple:
    """What a bundle's files look like now: a rejected bundle is tried again only when this changes
    (for example once a copy into the model store has finished)."""
    paths = [version_dir / "fingerprint.pb", *sorted(bundle_dir(version_dir).glob("*"))]
    stamp = []
    for path in paths:
        try:
            info = path.stat()
            stamp.append((path.name, info.st_size, info.st_mtime_ns))
        except OSError:
            stamp.append((path.name, None, None))
    return tuple(stamp)


def _versions(versions) -> str:
    return ", ".join(map(str, sorted(versions))) or "none"


class ModelVersions:
    """The loaded versions, what TF Serving serves, and the active version (see the module docstring)."""

    def __init__(
        self,
        base_path: str | Path,
        client: PredictorClient,
        build: Callable[[Bundle], ServedVersion],
        *,
        keep: int = 2,
        poll_seconds: float = 1.0,
        load: Callable[[Path], Bundle] = load_bundle,
        on_switch: Callable[[int | None], None] | None = None,
        on_reject: Callable[[], None] | None = None,
        on_refuse: Callable[[int], None] | None = None,
    ):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.base_path = Path(base_path)
        self.client = client
        self.build = build
        self.load = load
        self.keep = keep
        self.poll_seconds = poll_seconds
        self._on_switch = on_switch or (lambda version: None)
        self._on_reject = on_reject or (lambda: None)
        self._on_refuse = on_refuse or (lambda version: None)
        self.loaded: dict[int, ServedVersion] = {}
        self._stamps: dict[int, tuple] = {}  # version -> its files, when loaded
        self.rejected: dict[int, tuple[tuple, str]] = {}  # version -> (files stamp, why)
        self.states: dict[int, str] = {}  # TF Serving's, at the last check
        self.fits: dict[int, list[str]] = {}  # metadata problems per loaded version ([] when it fits)
        self.recorded: Interface | None = None  # the store's interface.json, at the last scan
        self.refused: dict[int, tuple[ServedVersion, list[str]]] = {}  # interface changes, said once per bundle
        self._last_interface: Interface | None = None  # the last active version's, kept through an outage
        self._interface_error = ""  # why the interface file could not be read, at the last scan
        self.active: ServedVersion | None = None
        self.predictor_reachable = False
        self.reason = "TF Serving not checked yet"
        self.checked_at = -float("inf")
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None

    # -- the model store on disk ------------------------------------------------------------------

    def scan(self) -> None:
        """Load the bundles of the newest ``keep`` version folders and forget older ones."""
        self._apply(*self._scan())

    def _scan(self) -> tuple[dict, dict, dict, Interface | None]:
        """(loaded, stamps, rejected, recorded interface) as the model store is now. Touches no shared state,
        so it can run in a worker thread: loading a bundle hashes its files and reads its arrays."""
        loaded, stamps, rejected = {}, {}, {}
        try:
            recorded, self._interface_error = read_interface(self.base_path), ""
        except InterfaceFileError as exc:
            recorded = self.recorded  # the last one read stays: a file being mended is no reason to change
            if str(exc) != self._interface_error:  # said once, not at every look (scans never overlap)
                self._interface_error = str(exc)
                log.error("%s", json.dumps({"event": "interface_file_unreadable", "error": str(exc)}))
        for version in model_versions(self.base_path)[-self.keep:]:
            folder = self.base_path / str(version)
            stamp = _files_stamp(folder)
            if version in self.loaded and self._stamps.get(version) == stamp:
                loaded[version], stamps[version] = self.loaded[version], stamp
                continue
            if version in self.rejected and self.rejected[version][0] == stamp:
                rejected[version] = self.rejected[version]
                continue
            try:
                loaded[version] = self.build(self.load(folder))
            except (BundleError, UnsupportedEstimator, ValueError, OSError) as exc:
                rejected[version] = (stamp, str(exc))
                self._on_reject()
                log.error("%s", json.dumps({"event": "bundle_rejected", "model_version": version, "error": str(exc)}))
                continue
            stamps[version] = stamp
            log.info("%s", json.dumps({"event": "bundle_loaded", "model_version": version, "path": str(folder)}))
        return loaded, stamps, rejected, recorded

    def _apply(self, loaded: dict, stamps: dict, rejected: dict, recorded: Interface | None = None) -> None:
        """Swap in a scan's result; a version whose bundle was (re)loaded has its metadata checked again."""
        self.fits = {v: p for v, p in self.fits.items() if v in loaded and loaded[v] is self.loaded.get(v)}
        self.loaded, self._stamps, self.rejected, self.recorded = loaded, stamps, rejected, recorded
        self.refused = {v: r for v, r in self.refused.items() if loaded.get(v) is r[0]}

    def problems(self) -> list[str]:
        """Why version folders were not loaded, or are loaded and not served."""
        return ([f"version {v}: {why}" for v, (_, why) in sorted(self.rejected.items())]
                + [f"version {v} would change the interface its clients call: {'; '.join(changes)}"
                   for v, (_, changes) in sorted(self.refused.items()) if v in self.loaded])

    # -- the interface its clients call -------------------------------------------------------------

    @property
    def interface(self) -> Interface | None:
        """The interface served: the active version's, else the last active one's (a TF Serving outage changes
        nothing), else the store's record (None: the first version served sets it)."""
        if self.active is not None:
            return self.active.interface
        return self._last_interface or self.recorded

    def keeps_interface(self, served: ServedVersion) -> bool:
        """Whether ``served`` answers the clients of the interface served; a first refusal of each bundle is said
        in a log line naming every difference, and counted."""
        held = self.interface
        if held is None or served.interface is None:
            return True
        changes = differences(held, served.interface)
        if not changes:
            return True
        if self.refused.get(served.version, (None,))[0] is not served:
            self.refused[served.version] = (served, changes)
            self._on_refuse(served.version)
            serving = self.active.version if self.active is not None else None
            log.error("%s", json.dumps({
                "event": "model_interface_refused", "model_version": served.version, "serving": serving,
                "differences": changes,
                "remedy": "every client of the served interface would break: publish this version under a new "
                          "model name (model.train --model-name NEW), served beside this one, and move the clients"}))
        return False

    # -- TF Serving ---------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Look at the model store and at TF Serving again, and switch if the best version changed."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await self._refresh()

    async def _refresh(self) -> None:
        self._apply(*await asyncio.to_thread(self._scan))
        try:
            self.states = await self.client.version_states()
        except PredictorError as exc:
            self._set(self.active, False, f"TF Serving is unreachable: {exc}")
            return
        finally:
            self.checked_at = time.monotonic()
        loaded = self.loaded
        for version in sorted(loaded, reverse=True):
            if self.states.get(version) != "AVAILABLE" or not self.keeps_interface(loaded[version]):
                continue
            # A fit holds for the bundle's life; a misfit is asked again at every check, since the predictor can
            # change under the same name: a new pod behind the Service (seen when the fused overlay's predictor was
            # replaced by the kind overlay's, which a cached misfit left un-Ready for good).
            if self.fits.get(version) != []:
                try:
                    metadata = await self.client.metadata(version)
                except PredictorError as exc:
                    log.warning("metadata of version %d not read (%s); trying again at the next check", version, exc)
                    continue
                before = self.fits.get(version)
                self.fits[version] = metadata_problems(metadata, loaded[version].pipeline.contract)
                if self.fits[version] and self.fits[version] != before:
                    log.error("%s", json.dumps({"event": "model_does_not_fit", "model_version": version,
                                                "problems": self.fits[version]}))
            if not self.fits[version]:
                self._set(loaded[version], True, "")
                return
        self._set(None, True, self._why_none())

    def _why_none(self) -> str:
        available = [v for v, state in self.states.items() if state == "AVAILABLE"]
        parts = [f"TF Serving serves version(s) {_versions(available)} of model {self.client.model_name!r}; "
                 f"the transformer has verified bundles for version(s) {_versions(self.loaded)} "
                 f"(from {self.base_path})"]
        misfits = [f"version {v} does not fit its bundle: {'; '.join(p)}" for v, p in sorted(self.fits.items()) if p]
        parts += misfits + self.problems()
        parts.append("no version is in both: deploy the model store's version folders to TF Serving and the "
                     "transformer alike (same storage URI), or wait until TF Serving has loaded the new version")
        return "; ".join(parts)

    def _set(self, active: ServedVersion | None, reachable: bool, reason: str) -> None:
        was_ready = self.active is not None and self.predictor_reachable
        previous = self.active.version if self.active else None
        self.active, self.predictor_reachable, self.reason = active, reachable, reason
        if active is not None and active.interface is not None:
            self._last_interface = active.interface
        now = active.version if active else None
        if now != previous:
            self._on_switch(now)
            log.info("%s", json.dumps({"event": "model_version_switch", "from": previous, "to": now,
                                       **({"reason": reason} if reason else {})}))
        if was_ready != self.ready_now():
            log.log(logging.INFO if self.ready_now() else logging.WARNING, "%s",
                    json.dumps({"event": "readiness", "ready": self.ready_now(), "model_version": now,
                                "reason": reason}))

    # -- what requests and probes ask ---------------------------------------------------------------

    def ready_now(self) -> bool:
        return self.active is not None and self.predictor_reachable

    async def ready(self) -> bool:
        """Readiness: a version is active and TF Serving answered at the last check."""
        self.start()
        if self.checked_at == -float("inf"):
            await self.refresh()
        return self.ready_now()

    def current(self, exclude: int | None = None) -> ServedVersion:
        """The version a new request uses (the best one other than ``exclude``, when given).

        Raises:
            NoServableVersion: no version is both loaded here and served by TF Serving.
        """
        self.start()
        if exclude is None or (self.active is not None and self.active.version != exclude):
            if self.active is None:
                raise NoServableVersion(self.reason)
            return self.active
        loaded = self.loaded
        for version in sorted(loaded, reverse=True):
            if (version != exclude and self.states.get(version) == "AVAILABLE" and self.fits.get(version) == []
                    and self.keeps_interface(loaded[version])):
                return loaded[version]
        raise NoServableVersion(f"version {exclude} is no longer served and no other version is ready: "
                                + self._why_none())

    async def version_missing(self, since: float) -> None:
        """A call pinned to a version found TF Serving without it: look again, once for all
        requests that failed since ``since``."""
        if self.checked_at < since:
            await self.refresh()

    # -- the background check ---------------------------------------------------------------------

    def start(self) -> None:
        """Poll the model store and TF Serving every ``poll_seconds`` (needs a running event loop)."""
        if self._task is None or self._task.done():
            try:
                self._task = asyncio.get_running_loop().create_task(self._poll())
            except RuntimeError:  # no loop yet (start-up): the first request or probe starts it
                pass

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the check must outlive any one failure
                log.exception("checking the model versions failed; trying again")
            await asyncio.sleep(self.poll_seconds)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
