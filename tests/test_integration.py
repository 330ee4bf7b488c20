"""The transformer and the predictor as real processes on loopback, checked against an offline computation."""

import asyncio
import json

import httpx
import numpy as np
import pytest
from conftest import MODEL_NAME, assert_same_predictions


def predict_url(stack) -> str:
    return f"{stack.transformer_url}/v1/models/{MODEL_NAME}:predict"


def post(stack, body, **kwargs) -> httpx.Response:
    return httpx.post(predict_url(stack), json=body, timeout=30.0, **kwargs)


def as_objects(rows, names):
    return [dict(zip(names, map(float, row))) for row in rows]


def test_transformer_reports_ready(stack):
    response = httpx.get(f"{stack.transformer_url}/v1/models/{MODEL_NAME}")
    assert response.status_code == 200
    assert response.json() == {"name": MODEL_NAME, "ready": True}


def test_rows_as_objects_match_offline(stack, offline, raw_users):
    rows = raw_users[:20]
    response = post(stack, {"instances": as_objects(rows, offline.feature_names)})
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"], offline.predictions(rows))


def test_rows_as_lists_match_offline(stack, offline, raw_users):
    rows = raw_users[20:40]
    response = post(stack, {"instances": rows.tolist()})
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"], offline.predictions(rows))


def test_mixed_row_forms_in_one_request(stack, offline, raw_users):
    rows = raw_users[40:46]
    instances = [row.tolist() if i % 2 else dict(zip(offline.feature_names, map(float, row)))
                 for i, row in enumerate(rows)]
    response = post(stack, {"instances": instances})
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"], offline.predictions(rows))


def test_many_rows_in_one_request(stack, offline, raw_users):
    rows = raw_users  # 400 rows in one request
    response = post(stack, {"instances": rows.tolist()})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == len(rows)
    assert_same_predictions(predictions, offline.predictions(rows))


def test_integer_json_numbers_are_accepted(stack, offline, raw_users):
    rows = np.round(raw_users[:5])
    body = {"instances": [[int(v) for v in row] for row in rows]}
    response = post(stack, body)
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"], offline.predictions(rows))


def test_answer_respects_the_rules(stack, offline, raw_users):
    response = post(stack, {"instances": raw_users[:50].tolist()})
    k, threshold = offline.rules["top_k"], offline.rules["min_score"]
    for prediction in response.json()["predictions"]:
        scores = [item["score"] for item in prediction["items"]]
        assert len(scores) <= k
        assert scores == sorted(scores, reverse=True)
        assert all(s >= np.float32(threshold) for s in scores)
        assert 0 <= prediction["segment"] < offline.manifest["n_segments"]


def test_body_without_content_type(stack, offline, raw_users):
    rows = raw_users[:2]
    response = httpx.post(predict_url(stack), content=json.dumps({"instances": rows.tolist()}).encode(),
                          headers={"content-type": "text/plain"})
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"], offline.predictions(rows))


def test_kserve_rest_client(stack, offline, raw_users):
    from kserve.inference_client import InferenceRESTClient, RESTConfig

    rows = raw_users[60:64]

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v1", timeout=30))
        try:
            return await client.infer(stack.transformer_url, {"instances": rows.tolist()}, model_name=MODEL_NAME)
        finally:
            await client.close()

    result = asyncio.run(call())
    assert_same_predictions(result["predictions"], offline.predictions(rows))


def test_concurrent_requests_all_answered(stack, offline, raw_users):
    rows = raw_users[:64]
    expected = offline.predictions(rows)

    async def run():
        async with httpx.AsyncClient(timeout=30.0) as client:
            return await asyncio.gather(*[
                client.post(predict_url(stack), json={"instances": [rows[i].tolist()]}) for i in range(len(rows))
            ])

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(rows)
    got = [r.json()["predictions"][0] for r in responses]
    assert_same_predictions(got, expected)


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"instances": [[1.0, 2.0]]}, 400, "instances[0]: a list row must have"),
        ({"rows": []}, 400, "no 'instances' field"),
        ({"instances": []}, 400, "'instances' is empty"),
        ({"instances": [{"nope": 1}]}, 400, "unknown feature(s) 'nope'"),
    ],
)
def test_bad_request_gets_4xx_and_server_keeps_serving(stack, raw_users, body, status, fragment):
    response = post(stack, body)
    assert response.status_code == status
    assert fragment in response.json()["error"]
    assert post(stack, {"instances": raw_users[:1].tolist()}).status_code == 200


@pytest.mark.parametrize("flags", [
    ["--full_scores", "--offload_rows", "64"],
    ["--kernels", "sklearn", "--coalesce_inflight", "0"],
], ids=["full-scores-offloaded", "sklearn-uncoalesced"])
def test_every_score_path_gives_the_same_answers(stack, offline, raw_users, tmp_path, flags):
    """--full_scores asks TF Serving for all item scores instead of its best candidates, --offload_rows
    runs large batches in a worker thread, --kernels sklearn runs the fitted estimators themselves,
    --coalesce_inflight 0 sends each request's own call: same results."""
    full = stack.another_transformer(log_dir=tmp_path, transformer_args=flags)
    full.start_transformer()
    try:
        rows = raw_users[:80]
        response = httpx.post(predict_url(full), json={"instances": rows.tolist()}, timeout=30)
        assert response.status_code == 200, response.text
        assert_same_predictions(response.json()["predictions"], offline.predictions(rows))
        one = httpx.post(predict_url(full), json={"instances": rows[:1].tolist()}, timeout=30)
        assert_same_predictions(one.json()["predictions"], offline.predictions(rows[:1]))
        metrics = httpx.get(f"{full.transformer_url}/metrics").text
        # two requests, two predictor calls of 80 and 1 rows
        assert 'embedder_predictor_call_rows_sum{model_name="embedder"} 81.0' in metrics
        assert 'embedder_predictor_call_rows_count{model_name="embedder"} 2.0' in metrics
    finally:
        full.stop()


def test_a_port_taken_between_picking_and_binding_is_picked_again(stack, tmp_path, monkeypatch, raw_users, offline):
    """LocalStack picks free ports, and the transformer binds them a moment later: if another process took one
    meanwhile, the transformer cannot start, and the stack starts it again on new ports."""
    import socket

    import scripts.localstack as localstack

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        real = localstack.free_port
        monkeypatch.setattr(localstack, "free_port", lambda: next(ports, None) or real())
        moved = stack.another_transformer(log_dir=tmp_path)
        assert moved.transformer_port == busy
        moved.start_transformer()
    try:
        assert moved.transformer_port != busy
        response = httpx.post(predict_url(moved), json={"instances": raw_users[:2].tolist()}, timeout=30)
        assert_same_predictions(response.json()["predictions"], offline.predictions(raw_users[:2]))
    finally:
        moved.stop()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        chosen = stack.another_transformer(log_dir=tmp_path, transformer_port=taken.getsockname()[1])
        with pytest.raises(localstack.StackError) as caught:  # a port the caller chose is never changed
            chosen.start_transformer(timeout=30)
        assert localstack.port_taken(str(caught.value)) and chosen.transformer_port == taken.getsockname()[1]
