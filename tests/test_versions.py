"""Which model version answers, in process: the model store on disk (folders with a stand-in bundle
loader), TF Serving as a scripted client, and the switch between them. The same logic runs end to end in
tests/test_model_updates.py; here each rule is pinned on its own, in milliseconds."""

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest

from small_bundle import TFServing, signature

from transformer.store.bundle import BundleError
from transformer.predictor import Contract, PredictorError
from transformer.store.versions import ModelVersions, NoServableVersion, ServedVersion

CONTRACT = Contract("serving_default", "features", 2, {"embedding": ("DT_FLOAT", 3), "scores": ("DT_FLOAT", 3)})


def tf_serving(states=None, metadata=None) -> TFServing:
    client = TFServing()
    client.states, client.metadata_by_version = dict(states or {}), dict(metadata or {})
    return client


class Store:
    """Version folders on disk; a folder holding ``broken`` fails to load with that file's text."""

    def __init__(self, root):
        self.root = root
        self.loads = []

    def add(self, version, broken=None):
        folder = self.root / str(version)
        (folder / "assets.extra" / "transformer-bundle").mkdir(parents=True)
        (folder / "fingerprint.pb").write_bytes(b"fp")
        if broken:
            (folder / "assets.extra" / "transformer-bundle" / "broken").write_text(broken)
        return folder

    def load(self, folder):
        self.loads.append(int(folder.name))
        broken = folder / "assets.extra" / "transformer-bundle" / "broken"
        if broken.exists():
            raise BundleError(broken.read_text())
        return SimpleNamespace(version=int(folder.name))


def build(bundle):
    return ServedVersion(pipeline=SimpleNamespace(version=bundle.version, contract=CONTRACT), forward=None)


def versions(tmp_path, client, **options):
    store = Store(tmp_path)
    switches, rejections = [], []
    watcher = ModelVersions(tmp_path, client, build, load=store.load, on_switch=switches.append,
                            on_reject=lambda: rejections.append(1), **options)
    return watcher, store, switches, rejections


def refresh(watcher):
    asyncio.run(watcher.refresh())


def test_the_newest_version_loaded_here_and_available_there_answers(tmp_path):
    client = tf_serving({1: "AVAILABLE", 2: "AVAILABLE", 3: "LOADING"})
    watcher, store, switches, _ = versions(tmp_path, client, keep=3)
    for v in (1, 2, 3):
        store.add(v)
    refresh(watcher)
    assert watcher.ready_now() and watcher.current().version == 2 and switches == [2]
    assert client.asked == ["states", ("metadata", 3 - 1)]  # only the candidate's metadata is read
    client.states[3] = "AVAILABLE"
    refresh(watcher)
    assert watcher.current().version == 3 and switches == [2, 3]
    refresh(watcher)
    assert switches == [2, 3] and client.asked.count(("metadata", 3)) == 1  # a fit is checked once per bundle
    del client.states[3]  # TF Serving unloads it: back to the previous version
    refresh(watcher)
    assert watcher.current().version == 2 and switches == [2, 3, 2]


def test_only_the_newest_keep_versions_are_loaded(tmp_path):
    watcher, store, _, _ = versions(tmp_path, tf_serving({v: "AVAILABLE" for v in range(1, 6)}), keep=2)
    for v in (1, 5, 3):
        store.add(v)
    (tmp_path / "4-incoming").mkdir()
    watcher.scan()
    assert sorted(watcher.loaded) == [3, 5] and store.loads == [3, 5]
    watcher.scan()
    assert store.loads == [3, 5]  # unchanged files: not loaded again
    store.add(6)
    watcher.scan()
    assert sorted(watcher.loaded) == [5, 6] and store.loads == [3, 5, 6]
    with pytest.raises(ValueError, match="^keep must be at least 1$"):
        versions(tmp_path, tf_serving(), keep=0)
    one, _, _, _ = versions(tmp_path, tf_serving(), keep=1)
    one.scan()
    assert sorted(one.loaded) == [6]


def test_before_the_first_check_nothing_is_ready_and_the_reason_says_so(tmp_path):
    watcher, store, _, _ = versions(tmp_path, tf_serving({1: "AVAILABLE"}))
    store.add(1)
    watcher.scan()
    assert (watcher.active, watcher.predictor_reachable, watcher.states, watcher.ready_now()) == (None, False, {}, False)
    with pytest.raises(NoServableVersion) as caught:
        watcher.current()
    assert str(caught.value) == "TF Serving not checked yet"


def test_a_rejected_bundle_is_logged_counted_and_tried_again_only_when_its_files_change(tmp_path, caplog):
    client = tf_serving({1: "AVAILABLE", 2: "AVAILABLE"})
    watcher, store, switches, rejections = versions(tmp_path, client)
    store.add(1)
    folder = store.add(2, broken="scaler.joblib has sha256 00, the manifest says 11")
    with caplog.at_level(logging.INFO, logger="transformer"):
        refresh(watcher)
        refresh(watcher)
    assert watcher.current().version == 1 and switches == [1]
    assert store.loads == [1, 2] and rejections == [1]  # tried once while its files stay the same
    assert watcher.problems() == ["version 2: scaler.joblib has sha256 00, the manifest says 11"]
    events = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    assert {"event": "bundle_rejected", "model_version": 2,
            "error": "scaler.joblib has sha256 00, the manifest says 11"} in events
    assert {"event": "model_version_switch", "from": None, "to": 1} in events
    (folder / "assets.extra" / "transformer-bundle" / "broken").unlink()  # the copy has finished
    refresh(watcher)
    assert watcher.current().version == 2 and store.loads == [1, 2, 2] and watcher.problems() == []


def test_a_version_that_does_not_fit_its_bundle_is_passed_over(tmp_path, caplog):
    client = tf_serving({1: "AVAILABLE", 2: "AVAILABLE"}, metadata={2: signature(input_width=4)})
    watcher, store, _, _ = versions(tmp_path, client)
    store.add(1)
    store.add(2)
    with caplog.at_level(logging.ERROR, logger="transformer"):
        refresh(watcher)
    assert watcher.current().version == 1
    assert watcher.fits == {2: ["input 'features' is DT_FLOAT [-1, 4], the bundle expects DT_FLOAT [-1, 2]"], 1: []}
    (record,) = caplog.records
    assert json.loads(record.getMessage()) == {"event": "model_does_not_fit", "model_version": 2, "problems": [
        "input 'features' is DT_FLOAT [-1, 4], the bundle expects DT_FLOAT [-1, 2]"]}


def test_metadata_that_cannot_be_read_is_asked_again_at_the_next_check(tmp_path):
    client = tf_serving({1: "AVAILABLE"}, metadata={1: PredictorError(502, "model metadata answered INTERNAL")})
    watcher, store, switches, _ = versions(tmp_path, client)
    store.add(1)
    refresh(watcher)
    assert not watcher.ready_now() and switches == [] and 1 not in watcher.fits
    client.metadata_by_version = {}
    refresh(watcher)
    assert watcher.ready_now() and switches == [1]


def test_when_no_version_can_answer_the_message_names_both_sides(tmp_path):
    client = tf_serving({2: "AVAILABLE", 3: "AVAILABLE"}, metadata={3: signature(input_width=5)})
    watcher, store, switches, _ = versions(tmp_path, client, keep=3)
    store.add(1)
    store.add(3)
    store.add(4, broken="no manifest.json")
    refresh(watcher)
    assert switches == [] and watcher.predictor_reachable and not watcher.ready_now()
    expected = (f"TF Serving serves version(s) 2, 3 of model 'embedder'; the transformer has verified bundles for "
                f"version(s) 1, 3 (from {tmp_path}); version 3 does not fit its bundle: input 'features' is "
                "DT_FLOAT [-1, 5], the bundle expects DT_FLOAT [-1, 2]; version 4: no manifest.json; no version is "
                "in both: deploy the model store's version folders to TF Serving and the transformer alike (same "
                "storage URI), or wait until TF Serving has loaded the new version")
    assert watcher.reason == expected
    with pytest.raises(NoServableVersion) as caught:
        watcher.current()
    assert (caught.value.status, caught.value.cause, str(caught.value)) == (503, "no_servable_version", expected)
    client.states = {}
    refresh(watcher)
    assert watcher.reason.startswith("TF Serving serves version(s) none of model 'embedder'; the transformer has "
                                     "verified bundles for version(s) 1, 3")


def test_an_unreachable_tf_serving_keeps_the_version_but_not_readiness(tmp_path, caplog):
    client = tf_serving({1: "AVAILABLE"})
    watcher, store, switches, _ = versions(tmp_path, client)
    store.add(1)
    refresh(watcher)
    client.unreachable = True
    with caplog.at_level(logging.INFO, logger="transformer"):
        refresh(watcher)
    assert watcher.active.version == 1 and not watcher.ready_now() and switches == [1]
    assert watcher.reason == "TF Serving is unreachable: connection refused"
    (record,) = [r for r in caplog.records if "readiness" in r.getMessage()]
    assert record.levelno == logging.WARNING and json.loads(record.getMessage()) == {
        "event": "readiness", "ready": False, "model_version": 1, "reason": "TF Serving is unreachable: connection "
                                                                           "refused"}
    client.unreachable = False
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transformer"):
        refresh(watcher)
    assert watcher.ready_now() and watcher.reason == ""
    (record,) = [r for r in caplog.records if "readiness" in r.getMessage()]
    assert record.levelno == logging.INFO and json.loads(record.getMessage())["ready"] is True


def test_a_request_whose_version_went_away_is_given_another_that_is_ready(tmp_path):
    client = tf_serving({1: "AVAILABLE", 2: "LOADING"})
    watcher, store, _, _ = versions(tmp_path, client)
    store.add(1)
    store.add(2)
    refresh(watcher)
    with pytest.raises(NoServableVersion, match="^version 1 is no longer served and no other version is ready: "):
        watcher.current(exclude=1)  # version 2's fit was never checked: it is not given out
    client.states[2] = "AVAILABLE"
    refresh(watcher)
    assert watcher.current().version == 2
    assert watcher.current(exclude=1).version == 2  # the active one is not the excluded one
    assert watcher.current(exclude=2).version == 1  # checked when it was active
    client.states = {2: "AVAILABLE"}
    refresh(watcher)
    with pytest.raises(NoServableVersion) as caught:
        watcher.current(exclude=2)
    assert str(caught.value).startswith("version 2 is no longer served and no other version is ready: TF Serving "
                                        "serves version(s) 2 of model 'embedder'")


def test_a_missing_version_is_looked_up_once_for_every_request_that_failed_since(tmp_path):
    client = tf_serving({1: "AVAILABLE"})
    watcher, store, _, _ = versions(tmp_path, client)
    store.add(1)

    async def scenario():
        await watcher.refresh()
        checked = watcher.checked_at
        await watcher.version_missing(since=checked - 1)  # checked after the failure: nothing to do
        asked = len(client.asked)
        await watcher.version_missing(since=checked + 1)
        return asked, len(client.asked), watcher.checked_at > checked

    asked_before, asked_after, checked_again = asyncio.run(scenario())
    assert asked_after == asked_before + 1 and checked_again


def test_readiness_checks_once_before_answering_and_polls_after(tmp_path):
    client = tf_serving({1: "AVAILABLE"})
    watcher, store, _, _ = versions(tmp_path, client, poll_seconds=0.01)
    store.add(1)

    async def scenario():
        ready = await watcher.ready()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while client.asked.count("states") < 3 and loop.time() < deadline:  # the poller's own checks
            await asyncio.sleep(0.005)
        polled = client.asked.count("states")
        await watcher.close()
        return ready, polled

    ready, polled = asyncio.run(scenario())
    assert ready and polled >= 3
    watcher, _, _, _ = versions(tmp_path, tf_serving())
    watcher.start()  # no event loop yet (start-up): nothing started, nothing raised
    assert watcher._task is None


def test_the_log_tells_each_load_rejection_misfit_switch_and_readiness_change_once(tmp_path, caplog):
    """What an operator reads: one JSON line per event, at its level, in the order it happened."""
    client = tf_serving({1: "AVAILABLE", 3: "AVAILABLE"}, {3: signature(5)})
    watcher, store, _, _ = versions(tmp_path, client, keep=3)
    store.add(1), store.add(2, broken="the manifest is cut short"), store.add(3)

    def told(action):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="transformer"):
            action()
        return [(r.levelname, json.loads(r.getMessage())) for r in caplog.records]

    misfit = ["input 'features' is DT_FLOAT [-1, 5], the bundle expects DT_FLOAT [-1, 2]"]
    assert told(lambda: refresh(watcher)) == [
        ("INFO", {"event": "bundle_loaded", "model_version": 1, "path": str(tmp_path / "1")}),
        ("ERROR", {"event": "bundle_rejected", "model_version": 2, "error": "the manifest is cut short"}),
        ("INFO", {"event": "bundle_loaded", "model_version": 3, "path": str(tmp_path / "3")}),
        ("ERROR", {"event": "model_does_not_fit", "model_version": 3, "problems": misfit}),
        ("INFO", {"event": "model_version_switch", "from": None, "to": 1}),
        ("INFO", {"event": "readiness", "ready": True, "model_version": 1, "reason": ""}),
    ]
    client.unreachable = True
    assert told(lambda: refresh(watcher)) == [  # nothing changed in the store: nothing loaded or rejected again
        ("WARNING", {"event": "readiness", "ready": False, "model_version": 1,
                     "reason": "TF Serving is unreachable: connection refused"}),
    ]
    assert sorted(watcher.loaded) == [1, 3] and watcher.current().version == 1
    client.unreachable, client.states[1] = False, "UNLOADING"
    [(level, switch)] = told(lambda: refresh(watcher))  # still not ready: no readiness line
    assert (level, switch["event"], switch["from"], switch["to"]) == ("INFO", "model_version_switch", 1, None)
    assert switch["reason"] == watcher.reason and f"version 3 does not fit its bundle: {misfit[0]}; " in watcher.reason
    refresh(watcher)
    assert client.asked.count(("metadata", 3)) == 3  # a misfit is asked again at every check, and said once
    # TF Serving's model now fits (the predictor behind the Service was replaced): version 3 is served.
    client.metadata_by_version[3] = signature(2)
    assert told(lambda: refresh(watcher))[0][1] == {"event": "model_version_switch", "from": None, "to": 3}
    assert watcher.current().version == 3
    refresh(watcher)
    assert client.asked.count(("metadata", 3)) == 4  # a fit is not asked again


def test_a_version_whose_metadata_cannot_be_read_is_passed_over_until_the_next_check(tmp_path, caplog):
    client = tf_serving({1: "AVAILABLE", 2: "AVAILABLE"}, {2: PredictorError(504, "too slow")})
    watcher, store, _, _ = versions(tmp_path, client)
    store.add(1), store.add(2)
    with caplog.at_level(logging.INFO, logger="transformer"):
        refresh(watcher)
    assert watcher.current().version == 1
    assert "metadata of version 2 not read (too slow); trying again at the next check" in caplog.messages
    client.metadata_by_version[2] = signature()
    refresh(watcher)
    assert watcher.current().version == 2


class ContractStore(Store):
    """Version folders whose bundle says the embedding width its steps were fitted for (a file ``width``):
    rewriting that file is a new bundle for the same version, with its own contract."""

    def add(self, version, width=3):
        folder = super().add(version)
        self.write(version, width)
        return folder

    def write(self, version, width):
        (self.root / str(version) / "assets.extra" / "transformer-bundle" / "width").write_text(f"{width}\n" * width)

    def load(self, folder):
        self.loads.append(int(folder.name))
        width = len((folder / "assets.extra" / "transformer-bundle" / "width").read_text().splitlines())
        contract = Contract("serving_default", "features", 2, {"embedding": ("DT_FLOAT", width),
                                                               "scores": ("DT_FLOAT", 3)})
        return SimpleNamespace(version=int(folder.name), contract=contract)


def contract_versions(tmp_path, client):
    store = ContractStore(tmp_path)
    switches = []
    watcher = ModelVersions(tmp_path, client, lambda bundle: ServedVersion(
        pipeline=SimpleNamespace(version=bundle.version, contract=bundle.contract), forward=None),
        load=store.load, on_switch=switches.append)
    return watcher, store, switches


def test_a_bundle_fixed_in_place_is_checked_again_and_served(tmp_path):
    """A version whose bundle did not fit TF Serving's model is refused; once its files are rewritten with a
    bundle that fits, the old verdict must not outlive the old bundle: it is checked again and served."""
    client = tf_serving({4: "AVAILABLE"})
    watcher, store, switches = contract_versions(tmp_path, client)
    store.add(4, width=5)  # fitted for a 5-wide embedding; TF Serving's model has 3
    refresh(watcher)
    assert not watcher.ready_now() and watcher.fits[4] and switches == []
    with pytest.raises(NoServableVersion, match="version 4 does not fit its bundle"):
        watcher.current()
    store.write(4, width=3)  # the bundle made again, for the model TF Serving serves
    refresh(watcher)
    assert store.loads == [4, 4] and watcher.fits[4] == [] and watcher.current().version == 4 and switches == [4]
    assert client.asked.count(("metadata", 4)) == 2  # once per bundle


def test_a_bundle_broken_in_place_stops_being_served(tmp_path):
    client = tf_serving({4: "AVAILABLE"})
    watcher, store, switches = contract_versions(tmp_path, client)
    store.add(4, width=3)
    refresh(watcher)
    assert watcher.current().version == 4 and switches == [4]
    store.write(4, width=5)  # replaced by a bundle that no longer fits: the old "fits" must not carry over
    refresh(watcher)
    assert store.loads == [4, 4] and watcher.fits[4] and not watcher.ready_now() and switches == [4, None]


def test_a_verdict_is_forgotten_with_its_version(tmp_path):
    client = tf_serving({4: "AVAILABLE", 5: "AVAILABLE", 6: "AVAILABLE"})
    watcher, store, _ = contract_versions(tmp_path, client)
    store.add(4, width=5)
    store.add(5)
    refresh(watcher)
    assert set(watcher.fits) == {5} and watcher.current().version == 5  # 4 never checked: 5 answered first
    store.add(6)
    store.add(7)  # with keep=2, versions 4 and 5 leave the loaded set
    refresh(watcher)
    assert set(watcher.loaded) == {6, 7} and 5 not in watcher.fits and 4 not in watcher.fits


# -- the interface its clients call ------------------------------------------------------------------------------

FEATURES = ("sessions_30d", "spend_90d")


class InterfaceStore(Store):
    """Version folders whose bundle's features are written in a file of the folder."""

    def add(self, version, features=FEATURES, broken=None):
        folder = super().add(version, broken)
        (folder / "assets.extra" / "transformer-bundle" / "features").write_text("\n".join(features))
        return folder

    def load(self, folder):
        bundle = super().load(folder)
        bundle.features = tuple((folder / "assets.extra" / "transformer-bundle" / "features").read_text().split())
        return bundle


def interface_of(features=FEATURES, top_k=10):
    from transformer.store.interface import Interface

    return Interface(tuple(features), top_k, 4, "integer")


def interface_versions(tmp_path, client, **options):
    store = InterfaceStore(tmp_path)
    switches, refusals = [], []
    watcher = ModelVersions(tmp_path, client, lambda bundle: ServedVersion(
        pipeline=SimpleNamespace(version=bundle.version, contract=CONTRACT), forward=None,
        interface=interface_of(bundle.features)), load=store.load, on_switch=switches.append,
        on_refuse=refusals.append, **options)
    return watcher, store, switches, refusals


def test_a_version_that_would_change_the_interface_is_refused_once_said_and_the_served_one_keeps_answering(
        tmp_path, caplog):
    client = tf_serving({1: "AVAILABLE", 2: "AVAILABLE"})
    watcher, store, switches, refusals = interface_versions(tmp_path, client)
    store.add(1)
    refresh(watcher)
    assert watcher.current().version == 1
    store.add(2, features=("visits_30d", "spend_90d"))  # a plain retrain on a file with a renamed column
    with caplog.at_level(logging.INFO, logger="transformer"):
        refresh(watcher)
        refresh(watcher)
    assert watcher.current().version == 1 and watcher.ready_now() and switches == [1]
    assert refusals == [2]  # once, however often the store is looked at
    events = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    (refused,) = [e for e in events if e["event"] == "model_interface_refused"]
    assert refused["model_version"] == 2 and refused["serving"] == 1
    assert refused["differences"] == ["features: the candidate no longer has 'sessions_30d'; adds 'visits_30d'"]
    assert "--model-name NEW" in refused["remedy"]
    assert not [e for e in events if e["event"] == "model_version_switch"]
    assert watcher.problems() == ["version 2 would change the interface its clients call: features: the candidate "
                                  "no longer has 'sessions_30d'; adds 'visits_30d'"]
    del client.states[1]  # TF Serving no longer serves the old one: nothing else may answer its clients
    refresh(watcher)
    assert not watcher.ready_now()
    with pytest.raises(NoServableVersion, match="version 2 would change the interface its clients call"):
        watcher.current()
    client.states[1] = "AVAILABLE"
    store.add(3)  # the next retrain keeps the interface: served
    client.states[3] = "AVAILABLE"
    refresh(watcher)
    assert watcher.current().version == 3 and switches == [1, None, 3] and refusals == [2]


def test_a_version_rewritten_with_the_served_interface_is_served(tmp_path):
    client = tf_serving({1: "AVAILABLE", 2: "AVAILABLE"})
    watcher, store, switches, refusals = interface_versions(tmp_path, client)
    store.add(1)
    refresh(watcher)
    folder = store.add(2, features=FEATURES[::-1])  # reordered: a client sending lists would mix the columns
    refresh(watcher)
    assert watcher.current().version == 1 and refusals == [2]
    (folder / "assets.extra" / "transformer-bundle" / "features").write_text("\n".join(FEATURES) + "\n")
    refresh(watcher)
    assert watcher.current().version == 2 and watcher.problems() == [] and watcher.refused == {}


def test_a_transformer_started_after_an_incompatible_version_landed_serves_the_recorded_interface(tmp_path):
    from transformer.store.interface import write_interface

    client = tf_serving({1: "AVAILABLE", 2: "AVAILABLE"})
    watcher, store, switches, refusals = interface_versions(tmp_path, client)
    store.add(1)
    store.add(2, features=("visits_30d", "spend_90d"))
    write_interface(tmp_path, interface_of())  # what training and publishing record beside the versions
    refresh(watcher)
    assert watcher.current().version == 1 and refusals == [2]
    # Without the record, the newest version sets the interface: what a store written before it would do.
    (tmp_path / "interface.json").unlink()
    fresh, _, _, _ = interface_versions(tmp_path, client)
    refresh(fresh)
    assert fresh.current().version == 2


def test_an_unreadable_interface_file_is_said_and_the_last_one_read_stays(tmp_path, caplog):
    from transformer.store.interface import write_interface

    client = tf_serving({1: "AVAILABLE", 2: "AVAILABLE"})
    watcher, store, _, refusals = interface_versions(tmp_path, client)
    store.add(1)
    write_interface(tmp_path, interface_of())
    watcher.scan()
    (tmp_path / "interface.json").write_text("{not json")
    store.add(2, features=("visits_30d", "spend_90d"))
    with caplog.at_level(logging.ERROR, logger="transformer"):
        refresh(watcher)
        refresh(watcher)  # said once, not at every look
    assert watcher.current().version == 1 and watcher.recorded == interface_of() and refusals == [2]
    (error,) = [json.loads(r.getMessage()) for r in caplog.records if "interface_file_unreadable" in r.getMessage()]
    assert error["error"].startswith(f"{tmp_path / 'interface.json'} is not a model interface (JSONDecodeError")


def test_the_interface_served_outlives_an_outage_of_tf_serving(tmp_path):
    client = tf_serving({1: "AVAILABLE"})
    watcher, store, switches, refusals = interface_versions(tmp_path, client)
    store.add(1)
    refresh(watcher)
    client.states = {}  # TF Serving restarted and has nothing loaded yet
    refresh(watcher)
    assert watcher.active is None
    store.add(2, features=("visits_30d", "spend_90d"))
    client.states = {1: "AVAILABLE", 2: "AVAILABLE"}
    refresh(watcher)
    assert watcher.current().version == 1 and refusals == [2]
