"""The KServe model in process: ``EmbedderTransformer`` on small version folders, TF Serving scripted as a
deterministic function of its input, KServe's own pre -> predict -> post. Every answer is compared with the
offline computation (scikit-learn's scaler and KMeans, the same function, the rules in plain Python); the
version retry, the gRPC edge and v2 metadata are pinned here too. The servers run in tests/test_integration.py
and tests/test_protocols.py; these run in milliseconds."""

import asyncio
import threading
import time

import grpc
import orjson
import pytest
from grpc_interceptor.exceptions import GrpcException
from conftest import latency_logged, metric_value
from small_bundle import ROWS, TFServing, new_version, offline, transformer, write

from transformer.serving.admission import Admission
from transformer.store.bundle import MANIFEST_FILE, BundleError, bundle_dir, sha256_of
from transformer.model import EmbedderTransformer
from transformer.predictor import PredictorError, VersionNotServed


def call(model, body, headers=None):
    async def go():
        await model.versions.refresh()
        return await model(body, headers or {})

    return asyncio.run(go())


def same(got: list[dict], expected: list[dict]) -> None:
    assert [(p["segment"], [i["id"] for i in p["items"]]) for p in got] == \
        [(p["segment"], [i["id"] for i in p["items"]]) for p in expected]
    for g, e in zip(got, expected):
        assert g["segment_distance"] == pytest.approx(e["segment_distance"], rel=1e-6)
        assert [i["score"] for i in g["items"]] == [i["score"] for i in e["items"]]  # float32, exactly


def names(tmp_path, version: int) -> dict[str, str]:
    """The headers an answer of ``version`` carries: its number and its manifest's sha256."""
    manifest = bundle_dir(tmp_path / "embedder" / str(version)) / MANIFEST_FILE
    return {"x-model-version": str(version), "x-model-manifest-sha256": sha256_of(manifest)}


def test_a_v1_request_is_answered_as_offline_and_names_its_version(tmp_path):
    model = transformer(tmp_path, 4)
    answer, headers = call(model, {"instances": ROWS.tolist()})
    same(answer["predictions"], offline(ROWS))
    assert headers == names(tmp_path, 4)
    assert model._predictor.calls == [(4, 5)]


def test_rows_as_objects_and_the_sklearn_kernels_answer_alike(tmp_path):
    model = transformer(tmp_path, 4, kernels="sklearn", coalesce_inflight=0)
    answer, _ = call(model, {"instances": [{"b": float(b), "a": float(a)} for a, b in ROWS]})
    same(answer["predictions"], offline(ROWS))


def test_a_v2_request_is_answered_with_fused_modes_tensors(tmp_path):
    from transformer.protocols.v2 import from_rest

    model = transformer(tmp_path, 4)
    body = b'{"inputs": [{"name": "features", "datatype": "FP64", "shape": [5, 2], "data": %s}]}' % (
        str(ROWS.ravel().tolist()).encode())
    answer, headers = call(model, from_rest(body))
    tensors = {o["name"]: o["data"] for o in orjson.loads(answer.body)["outputs"]}
    expected = offline(ROWS)
    assert tensors["segment"] == [p["segment"] for p in expected]
    assert tensors["item_ids"] == [i for p in expected for i in ([j["id"] for j in p["items"]] + [""] * 2)[:2]]
    assert headers == names(tmp_path, 4)
    assert model.get_input_types() == [{"name": "features", "datatype": "FP64", "shape": [-1, 2]}]
    assert [o["datatype"] for o in model.get_output_types()] == ["INT64", "FP32", "BYTES", "FP32"]


def test_the_v2_metadata_describes_the_versions_the_features_and_the_artifact(tmp_path):
    model = transformer(tmp_path, 3, 4)
    asyncio.run(model.versions.refresh())
    meta = model.metadata()
    assert (meta["name"], meta["versions"], meta["platform"]) == ("embedder", ["4", "3"], "")
    assert meta["inputs"] == model.get_input_types() and meta["outputs"] == model.get_output_types()
    assert meta["parameters"] == {
        "version": "4", "manifest_sha256": names(tmp_path, 4)["x-model-manifest-sha256"], "feature_names": ["a", "b"],
        "per_feature_inputs": [{"name": "a", "datatype": "FP64", "shape": [-1]},
                               {"name": "b", "datatype": "FP64", "shape": [-1]}],
        "top_k": 2, "min_score": 0.25}
    assert model.metadata(3)["parameters"]["manifest_sha256"] == names(tmp_path, 3)["x-model-manifest-sha256"]
    with pytest.raises(KeyError, match="model embedder has no version 7 loaded; it has 4, 3"):
        model.metadata(7)
    model.versions.active = None  # as while TF Serving serves none of them
    with pytest.raises(KeyError, match=r"model embedder has no version answering yet \(loaded: 4, 3\); see its "
                                       "readiness"):
        model.metadata()


def test_a_request_whose_version_tf_serving_dropped_is_answered_once_more_by_the_other(tmp_path, caplog):
    tf_serving = TFServing(3)
    model = transformer(tmp_path, 3, 4, tf_serving=tf_serving)

    async def go():
        await model.versions.refresh()  # version 3 answers (and its metadata is checked)
        tf_serving.states[4] = "AVAILABLE"
        await model.versions.refresh()  # then version 4
        tf_serving.gone.add(4)  # unloaded, but TF Serving still lists it AVAILABLE a moment longer
        return await model({"instances": ROWS[:2].tolist()}, {"x-request-id": "again"})

    model.enable_latency_logging = True
    with caplog.at_level("INFO"):
        answer, headers = asyncio.run(go())
    same(answer["predictions"], offline(ROWS[:2]))
    assert headers == names(tmp_path, 3) and tf_serving.calls == [(4, 2), (3, 2)]
    assert latency_logged(caplog) == ["again"]  # KServe logs the answered try only


def test_a_dropped_version_with_no_other_to_answer_is_tf_servings_own_503(tmp_path):
    tf_serving = TFServing(4)
    model = transformer(tmp_path, 4, tf_serving=tf_serving)
    tf_serving.gone.add(4)
    with pytest.raises(VersionNotServed) as caught:
        call(model, {"instances": ROWS[:1].tolist()})
    assert (caught.value.status, str(caught.value)) == (503, "TF Serving does not serve version 4")
    assert tf_serving.calls == [(4, 1)]  # not tried again on the same version


def test_grpc_requests_go_through_the_edge_and_fail_with_grpc_codes(tmp_path):
    from kserve import InferRequest
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    model = transformer(tmp_path, 4, admission=Admission(max_requests=4))

    def infer(shape, values):
        request = pb.ModelInferRequest(model_name="embedder", id="g-1")
        request.inputs.add(name="features", datatype="FP64", shape=shape).contents.fp64_contents.extend(values)
        return InferRequest.from_grpc(request)

    response, _ = call(model, infer([5, 2], ROWS.ravel().tolist()))
    assert response.outputs[0].name == "segment"
    assert response.outputs[0].as_numpy().tolist() == [p["segment"] for p in offline(ROWS)]
    with pytest.raises(GrpcException) as caught:
        call(model, infer([1, 3], [1.0, 2.0, 3.0]))
    assert caught.value.status_code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details == "inputs[0] 'features': shape [1, 3], expected [n, 2] (features in this order: a, b)"
    assert model.admission.requests == 0


def test_a_missing_or_unusable_model_store_stops_the_start(tmp_path):
    empty = EmbedderTransformer("embedder", tmp_path / "nothing", predictor_host="unused")
    with pytest.raises(BundleError) as caught:
        empty.load()
    assert str(caught.value) == (f"no model version under {tmp_path / 'nothing'} has a usable bundle (no numeric "
                                 "version folders there): run `python -m model.train`, and point --model_base_path at "
                                 "the folder TF Serving serves (it holds the version folders)")
    new_version(tmp_path, 2)  # a SavedModel without its bundle
    bare = EmbedderTransformer("embedder", tmp_path / "embedder", predictor_host="unused")
    with pytest.raises(BundleError) as caught:
        bare.load()
    assert str(caught.value).startswith(f"no model version under {tmp_path / 'embedder'} has a usable bundle: "
                                        "version 2: no manifest.json in ")


def test_no_predictor_host_is_a_503_naming_the_flag(tmp_path):
    write(new_version(tmp_path, 4))
    model = EmbedderTransformer("embedder", tmp_path / "embedder")
    model.load()
    with pytest.raises(PredictorError) as caught:
        model.predictor
    assert (caught.value.status, str(caught.value)) == (503, "no predictor host configured: start with "
                                                             "--predictor_host HOST:PORT")


# -- what each request leaves behind: counts, gauges, logs --------------------------------------------------


def deltas(read, action):
    """``read()`` (a dict of numbers) after ``action()`` minus before."""
    before = read()
    result = action()
    after = read()
    return {key: after[key] - before[key] for key in after}, result


def test_a_request_counts_its_rows_segments_out_of_range_features_and_predictor_call(tmp_path):
    model = transformer(tmp_path, 4, coalesce_inflight=0)
    labels = [p["segment"] for p in offline(ROWS)]

    def read():
        v4 = {"model_version": "4"}
        return {"request rows": metric_value("embedder_request_rows_sum"),
                "requests": metric_value("embedder_request_rows_count"),
                "predictor rows": metric_value("embedder_predictor_call_rows_sum"),
                "predictor calls": metric_value("embedder_predictor_call_rows_count"),
                "a below": metric_value("embedder_feature_out_of_range_total", **v4, feature="a", side="below"),
                "a above": metric_value("embedder_feature_out_of_range_total", **v4, feature="a", side="above"),
                "b below": metric_value("embedder_feature_out_of_range_total", **v4, feature="b", side="below"),
                "b above": metric_value("embedder_feature_out_of_range_total", **v4, feature="b", side="above"),
                **{f"segment {s}": metric_value("embedder_segment_assignments_total", **v4, segment=str(s)) for s in (0, 1)}}

    counted, (answer, _) = deltas(read, lambda: call(model, {"instances": ROWS.tolist()}))
    same(answer["predictions"], offline(ROWS))
    # The training range is a in [-1, 1], b in [-2, 2]; ROWS has a = 2.0 (above), -1.2 and -3.0 (below), b = 2.5.
    assert counted == {"request rows": 5, "requests": 1, "predictor rows": 5, "predictor calls": 1,
                       "a below": 2, "a above": 1, "b below": 0, "b above": 1,
                       "segment 0": labels.count(0), "segment 1": labels.count(1)}


def test_the_answering_version_is_published_with_its_drift_monitor(tmp_path):
    from transformer.serving.metrics import DRIFT

    model = transformer(tmp_path, 4, drift_window=7)
    switches = metric_value("embedder_model_version_switches_total")
    asyncio.run(model.versions.refresh())
    active = model.versions.active
    assert metric_value("embedder_model_version") == 4
    assert metric_value("embedder_model_version_switches_total") == switches + 1
    assert DRIFT.monitors["embedder"] is active.metrics.drift and active.metrics.drift.features.window == 7
    features, segments = DRIFT.collect()
    assert (features.documentation, segments.documentation) == (
        "Population stability index of each raw feature over the recent rows against the training quantiles (> 0.25: "
        "significant drift)", "Population stability index of the segment mix over the recent rows against the "
        "training mix")
    drift = active.metrics.drift  # its values are NaN until min_rows rows came: compared as text
    assert [(s.labels, str(s.value)) for s in features.samples if s.labels["model_name"] == "embedder"] == [
        ({"model_name": "embedder", "feature": name}, str(value)) for name, value in drift.feature_psi().items()]
    assert [(s.labels, str(s.value)) for s in segments.samples if s.labels["model_name"] == "embedder"] == [
        ({"model_name": "embedder"}, str(drift.segment_psi()))]
    assert [s.labels["feature"] for s in features.samples if s.labels["model_name"] == "embedder"] == ["a", "b"]
    model._predictor.states[4] = "UNLOADING"  # none left to answer
    asyncio.run(model.versions.refresh())
    assert (metric_value("embedder_model_version"), DRIFT.monitors["embedder"]) == (0, None)
    assert metric_value("embedder_model_version_switches_total") == switches + 2


def test_a_version_without_training_quantiles_answers_without_drift_gauges(tmp_path, caplog):
    from sklearn.preprocessing import StandardScaler

    from transformer.serving.metrics import DRIFT

    write(new_version(tmp_path, 4), scaler=StandardScaler().fit(ROWS))
    model = EmbedderTransformer("embedder", tmp_path / "embedder", predictor_host="unused")
    model._predictor = TFServing(4)
    with caplog.at_level("INFO", logger="transformer"):
        model.load()
        answer, _ = call(model, {"instances": ROWS.tolist()})
    assert len(answer["predictions"]) == 5
    assert DRIFT.monitors["embedder"] is None
    assert ("version 4: no drift gauges (drift needs the training quantiles: the first scaler step is not a "
            "QuantileTransformer)") in caplog.messages


def test_a_request_is_counted_under_the_version_that_answered_it(tmp_path):
    model = transformer(tmp_path, 4)
    ok = dict(model_version="4", outcome="ok", cause="ok")
    before = metric_value("embedder_requests_total", **ok)
    asyncio.run(model.versions.refresh())
    response, _ = asyncio.run(model(grpc_infer([5, 2], ROWS.ravel().tolist()), {}))
    assert response.model_version == "4"
    assert metric_value("embedder_requests_total", **ok) == before + 1


def test_rejected_bundles_are_counted_and_each_reason_is_named(tmp_path):
    new_version(tmp_path, 2)  # a SavedModel without its bundle
    folder = new_version(tmp_path, 3)
    write(folder)
    (bundle_dir(folder) / "manifest.json").write_text("{")  # cut short
    model = EmbedderTransformer("embedder", tmp_path / "embedder", predictor_host="unused")
    rejected = metric_value("embedder_bundle_rejections_total")
    with pytest.raises(BundleError) as caught:
        model.load()
    problems = model.versions.problems()
    assert [problem.split(":")[0] for problem in problems] == ["version 2", "version 3"]
    assert str(caught.value) == (f"no model version under {tmp_path / 'embedder'} has a usable bundle: "
                                 f"{problems[0]}; {problems[1]}")
    assert metric_value("embedder_bundle_rejections_total") == rejected + 2


def test_in_flight_gauges_read_the_models_admission(tmp_path):
    admission = Admission(max_requests=64, min_requests=8)
    model = transformer(tmp_path, 4, admission=admission)
    admission.requests, admission.rows = 3, 17
    assert (metric_value("embedder_inflight_requests"), metric_value("embedder_inflight_rows"),
            metric_value("embedder_admission_limit")) == (3, 17, admission.limit)
    assert model.metrics.model_name == "embedder"


# -- the request path: deadlines, request ids, worker threads, coalescing -------------------------------------


def grpc_infer(shape, values, request_id="g-1"):
    from kserve import InferRequest
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name="embedder", id=request_id)
    request.inputs.add(name="features", datatype="FP64", shape=shape).contents.fp64_contents.extend(values)
    return InferRequest.from_grpc(request)


class Broken(TFServing):
    async def predict(self, features, contract):
        raise RuntimeError("a bug")


def test_a_grpc_requests_id_names_its_failure_in_the_answer_the_log_and_kserves_latency_log(tmp_path, caplog):
    model = transformer(tmp_path, 4, tf_serving=Broken(4))
    model.enable_latency_logging = True
    asyncio.run(model.versions.refresh())
    request = grpc_infer([1, 2], [0.5, 0.5])
    with caplog.at_level("INFO"), pytest.raises(GrpcException) as caught:
        asyncio.run(model(request, {"x-request-id": "req-7"}))
    assert (caught.value.status_code, caught.value.details) == (grpc.StatusCode.INTERNAL,
                                                                "internal error (request id req-7)")
    crashed = [orjson.loads(r.getMessage()) for r in caplog.records if "request_crashed" in r.getMessage()]
    assert crashed == [{"event": "request_crashed", "request_id": "req-7"}]

    caplog.clear()
    model._predictor = TFServing(4)
    with caplog.at_level("INFO"):
        asyncio.run(model(request, {"x-request-id": "req-8"}))
        asyncio.run(model({"instances": ROWS[:1].tolist()}, {"x-request-id": "rest-9"}))
    assert latency_logged(caplog) == ["req-8", "rest-9"]

    model._predictor = Broken(4)
    with pytest.raises(GrpcException) as caught:
        asyncio.run(model(request, {}))  # no id sent: one is made for it
    assert caught.value.details.startswith("internal error (request id ")
    made = caught.value.details.removeprefix("internal error (request id ").removesuffix(")")
    assert len(made) == 32 and int(made, 16) >= 0


def test_a_grpc_requests_timeout_header_is_read(tmp_path, caplog):
    model = transformer(tmp_path, 4)
    asyncio.run(model.versions.refresh())
    with caplog.at_level("INFO", logger="transformer"), pytest.raises(GrpcException) as caught:
        asyncio.run(model(grpc_infer([1, 2], [0.5, 0.5]), {"x-request-timeout-ms": "soon", "x-request-id": "t-1"}))
    assert (caught.value.status_code, caught.value.details) == (
        grpc.StatusCode.INVALID_ARGUMENT, "x-request-timeout-ms must be a number of milliseconds between 0 and "
                                          "3600000, got 'soon'")
    [failed] = [orjson.loads(r.getMessage()) for r in caplog.records if "request_failed" in r.getMessage()]
    assert (failed["request_id"], failed["model"], failed["status"]) == ("t-1", "embedder", 400)


def test_a_passed_deadline_stops_the_request_before_each_stage(tmp_path):
    from transformer.serving.admission import Refused, deadline

    model = transformer(tmp_path, 4)

    async def stage(which):
        await model.versions.refresh()
        batch = await model.preprocess({"instances": ROWS[:1].tolist()})
        deadline.set(time.monotonic() - 1)
        await (model.preprocess({"instances": ROWS[:1].tolist()}) if which == "preprocess" else model.predict(batch))

    for which, before in (("preprocess", "parsing"), ("predict", "the predictor call")):
        with pytest.raises(Refused) as caught:
            asyncio.run(stage(which))
        assert (caught.value.status, str(caught.value)) == (
            504, f"the request's deadline passed before {before}; nothing more was computed for it")


def test_a_request_holds_its_rows_in_the_admission_count_until_answered(tmp_path):
    model = transformer(tmp_path, 4)

    async def held():
        await model.versions.refresh()
        await model.preprocess({"instances": ROWS.tolist()})
        return model.admission.rows

    assert asyncio.run(held()) == 5


def test_only_batches_above_offload_rows_run_in_a_worker_thread(tmp_path):
    here = threading.get_ident()

    def where(offload, rows):
        model = EmbedderTransformer("embedder", tmp_path, offload_rows=offload)
        return asyncio.run(model._compute(lambda a, b: (threading.get_ident() != here, a + b), rows, 1, 2))

    cases = [(0, 5), (1, 1), (1, 2), (4, 4), (4, 5)]
    assert [where(offload, rows) for offload, rows in cases] == [
        (False, 3), (False, 3), (True, 3), (False, 3), (True, 3)]


def test_offloaded_requests_run_their_scaling_and_ranking_in_a_worker_thread(tmp_path, monkeypatch):
    model = transformer(tmp_path, 4, offload_rows=2)  # two features, five rows: only the rows count
    offloaded = []
    to_thread = asyncio.to_thread

    async def recorded(fn, *args):
        if fn.__name__ != "_scan":  # the model store's scan always runs in a thread
            offloaded.append(fn.__name__)
        return await to_thread(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", recorded)
    answer, _ = call(model, {"instances": ROWS.tolist()})
    same(answer["predictions"], offline(ROWS))
    assert offloaded == ["scale", "rank"]
    offloaded.clear()
    call(model, {"instances": ROWS[:2].tolist()})
    assert offloaded == []


class Gated(TFServing):
    """Predict calls wait for ``gate`` to open."""

    def __init__(self, *versions):
        super().__init__(*versions)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def predict(self, features, contract):
        self.waiting += 1
        await self.gate.wait()
        return await super().predict(features, contract)


def test_requests_waiting_for_the_predictor_merge_up_to_coalesce_rows(tmp_path):
    tf_serving = Gated(4)
    model = transformer(tmp_path, 4, tf_serving=tf_serving, coalesce_inflight=1, coalesce_rows=3)
    sizes = [2, 2, 1, 2]  # the first is in flight; 2 + 1 wait together (3 rows), the last alone

    async def go():
        await model.versions.refresh()
        coalescer = model.versions.active.forward
        tasks = []
        for n in sizes:  # each request reaches the predictor, or waits for it, before the next is sent
            tasks.append(asyncio.create_task(model({"instances": ROWS[:n].tolist()}, {})))
            while tf_serving.waiting + len(coalescer.pending) < len(tasks):
                await asyncio.sleep(0)
        tf_serving.gate.set()
        return await asyncio.gather(*tasks)

    answers = asyncio.run(go())
    for n, (answer, _) in zip(sizes, answers):
        same(answer["predictions"], offline(ROWS[:n]))
    assert tf_serving.calls == [(4, 2), (4, 3), (4, 2)]


def test_a_request_whose_deadline_passes_while_it_waits_for_the_predictor_is_not_sent(tmp_path):
    tf_serving = Gated(4)
    model = transformer(tmp_path, 4, tf_serving=tf_serving, coalesce_inflight=1)

    async def go():
        await model.versions.refresh()
        first = asyncio.create_task(model({"instances": ROWS[:1].tolist()}, {}))
        while not tf_serving.waiting:
            await asyncio.sleep(0)
        late = asyncio.create_task(model(grpc_infer([2, 2], ROWS[:2].ravel().tolist()),
                                         {"x-request-timeout-ms": "1000"}))
        coalescer = model.versions.active.forward
        while not coalescer.pending and not late.done():  # the late request waits behind the first...
            await asyncio.sleep(0.001)
        [(_, _, its_deadline)] = coalescer.pending
        while time.monotonic() <= its_deadline:  # ...until past its deadline
            await asyncio.sleep(0.01)
        tf_serving.gate.set()
        await first
        with pytest.raises(GrpcException) as caught:
            await late
        return caught.value

    refused = asyncio.run(go())
    assert (refused.status_code, refused.details) == (
        grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed while it waited for the predictor; it was "
                                           "not sent")
    assert tf_serving.calls == [(4, 1)]


# -- readiness, metadata, construction ----------------------------------------------------------------------


def test_ready_only_while_tf_serving_serves_a_loaded_version(tmp_path):
    tf_serving = TFServing()  # version 4 not loaded by TF Serving yet
    model = EmbedderTransformer("embedder", tmp_path / "embedder", predictor_host="unused")
    model._predictor = tf_serving
    write(new_version(tmp_path, 4))
    assert asyncio.run(model.healthy()) is False  # not loaded here yet
    assert model.load() is True and model.ready is True

    async def readiness():
        await model.versions.refresh()
        return await model.healthy()

    assert asyncio.run(readiness()) is False
    tf_serving.states[4] = "AVAILABLE"
    assert asyncio.run(readiness()) is True


def test_only_the_newest_keep_versions_are_loaded_and_polled_at_the_given_period(tmp_path):
    model = transformer(tmp_path, 2, 3, 4, keep_versions=1, poll_seconds=0.25)
    assert sorted(model.versions.loaded) == [4]
    assert model.versions.poll_seconds == 0.25


def test_v2_metadata_follows_the_active_versions_catalogue_and_rules(tmp_path):
    from transformer.store.bundle import Rules

    model = EmbedderTransformer("embedder", tmp_path / "embedder", predictor_host="unused")
    assert (model.get_input_types(), model.get_output_types()) == ([], [])  # nothing loaded: nothing to say
    write(new_version(tmp_path, 4), item_ids=None, rules=Rules(min_score=0.25, top_k=5))
    model._predictor = TFServing(4)
    model.load()
    asyncio.run(model.versions.refresh())
    outputs = {o["name"]: o for o in model.get_output_types()}
    assert outputs["item_ids"] == {"name": "item_ids", "datatype": "INT64", "shape": [-1, 3]}  # top 5 of 3 items


def test_a_v2_answer_names_the_model_and_its_version(tmp_path):
    from transformer.protocols.v2 import from_rest

    model = transformer(tmp_path, 4)
    body = b'{"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, 2], "data": [0.5, 0.5]}]}'
    answer, _ = call(model, from_rest(body))
    document = orjson.loads(answer.body)
    assert (document["model_name"], document["model_version"]) == ("embedder", "4")


def test_full_scores_asks_for_every_score_even_when_the_model_offers_candidates(tmp_path):
    from dataclasses import replace

    from small_bundle import SPEC

    offering = replace(SPEC, candidates_signature="candidates", n_candidates=2)
    for full_scores, signature in ((False, "candidates"), (True, "serving_default")):
        base = tmp_path / str(full_scores)
        write(new_version(base, 4), model=offering)
        model = EmbedderTransformer("embedder", base / "embedder", predictor_host="unused", full_scores=full_scores)
        model._predictor = TFServing(4)
        model.load()
        assert model.versions.loaded[4].pipeline.contract.signature == signature


def test_the_sklearn_kernels_call_the_unpickled_estimators(tmp_path):
    from transformer.steps.kernels import SklearnScaler

    model = transformer(tmp_path, 4, kernels="sklearn")
    asyncio.run(model.versions.refresh())
    assert isinstance(model.versions.active.pipeline.scaler, SklearnScaler)


def test_a_model_made_in_python_has_the_command_lines_defaults(tmp_path):
    from transformer.__main__ import build_parser

    flags = build_parser().parse_args([])
    model = EmbedderTransformer("embedder", tmp_path)
    assert (model._predictor_api, model._predictor_grpc_port, model._predictor_timeout, model._retry.attempts,
            model.max_rows, model.offload_rows, model.kernels, model.coalesce_inflight, model.coalesce_rows,
            model.full_scores, model.keep_versions, model.poll_seconds, model.drift_window) == (
        flags.predictor_api, flags.predictor_grpc_port, flags.predictor_timeout, flags.predictor_retries + 1,
        flags.max_rows, flags.offload_rows, flags.kernels, flags.coalesce_inflight, flags.coalesce_rows,
        flags.full_scores, flags.model_versions, flags.model_poll_seconds, flags.drift_window)
    admission = model.admission
    assert (admission.max_requests, admission.max_rows, admission.default_timeout, admission.min_requests,
            admission.latency_budget) == (flags.max_inflight, flags.max_inflight_rows, flags.request_timeout,
                                          flags.min_inflight, flags.latency_budget_ms / 1000)
