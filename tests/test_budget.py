"""The CPU budget's stages (scripts/benchmark/budget.py): each sample goes to the stage of the innermost frame a
stage claims, and the table adds up."""

import pytest

from scripts.benchmark.budget import STAGES, budget_table, split_cpu, stage_of, stage_samples, thread_samples

OUTER = ("run (asyncio/runners.py:118);HttpToolsProtocol.on_message_complete (uvicorn/protocols/http/"
         "httptools_impl.py:300);FastPath.__call__ (transformer/serving/rest.py:190);respond (transformer/serving/"
         "rest.py:95);handle (transformer/serving/edge.py:80);DataPlane.infer (kserve/protocol/dataplane.py:473);"
         "EmbedderTransformer.__call__ (transformer/model.py:218);Model.__call__ (kserve/model.py:265)")


@pytest.mark.parametrize("inner, stage", [
    ("", "kserve"),
    (";EmbedderTransformer.preprocess (transformer/model.py:246);V1Codec.rows (transformer/protocols/v1.py:263);"
     "parse_instances (transformer/protocols/v1.py:130)", "parse"),
    (";EmbedderTransformer.preprocess (transformer/model.py:248);Pipeline.scale (transformer/pipeline.py:83);"
     "QuantileScaler.transform (transformer/steps/kernels.py:113)", "scale"),
    (";EmbedderTransformer.preprocess (transformer/model.py:247);VersionMetrics.observe_rows "
     "(transformer/serving/metrics.py:90);Histogram.observe (prometheus_client/metrics.py:600)", "metrics"),
    (";EmbedderTransformer.predict (transformer/model.py:254);GrpcPredictor.forward "
     "(transformer/predictor/grpc.py:150);UnaryUnaryCall._invoke (grpc/aio/_call.py:595)", "hop"),
    (";EmbedderTransformer.postprocess (transformer/model.py:263);Pipeline.rank (transformer/pipeline.py:89);"
     "NearestCentroid.assign (transformer/steps/kernels.py:183)", "rank"),
    (";EmbedderTransformer.postprocess (transformer/model.py:265);V1Codec.answer (transformer/protocols/v1.py:266);"
     "encode_predictions (transformer/protocols/v1.py:240)", "encode"),
    (";Admission.take_rows (transformer/serving/admission.py:120)", "edge"),
    (";RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:524)", "http"),
    (";Logger.info (logging/__init__.py:1488)", "kserve"),  # unclaimed frames belong to the innermost claimed one
])
def test_a_sample_goes_to_the_innermost_stage_that_claims_a_frame(inner, stage):
    assert stage_of(OUTER + inner) == stage


def test_the_loop_alone_and_grpcs_thread_have_their_stages():
    assert stage_of("run (asyncio/runners.py:118);BaseEventLoop._run_once (asyncio/base_events.py:1922)") == "rest"
    # the server's start-up frames around the loop are not a request's: the loop's own work is the rest
    started = ("<module> (transformer/__main__.py:258);serve (transformer/serving/server.py:81);start "
               "(kserve/model_server.py:410);run (asyncio/runners.py:190);run (asyncio/runners.py:118)")
    assert stage_of(started) == "rest"
    assert stage_of(started + ";predict (transformer/model.py:254)") == "hop"
    thread = ("Thread._bootstrap (threading.py:1002);Thread._bootstrap_inner (threading.py:1045);"
              "Thread.run (threading.py:982)")
    assert stage_of(thread) == "hop"
    assert stage_of(thread + ";_worker (concurrent/futures/thread.py:81)") == "rest"


def test_samples_are_counted_per_stage_and_the_table_adds_up():
    folded = (f"{OUTER};Pipeline.rank (transformer/pipeline.py:89) 3\n{OUTER} 1\n\n"
              f"{OUTER};encode_predictions (transformer/protocols/v1.py:240) 4\n")
    counts = stage_samples(folded)
    assert counts == {"rank": 3, "kserve": 1, "encode": 4}
    stages = {stage: {"samples": counts[stage], "share": counts[stage] / 8, "us": 800 * counts[stage] / 8}
              for stage, _ in STAGES}
    budget = {"target": "g", "concurrency": 16, "cpu_us": 800.0, "samples": 8, "requests": 100, "stages": stages}
    lines = budget_table([budget], {16: 100.0}, {("g", 16): 700.0})
    assert lines[0] == "| stage | (g) 16 clients: us (share) |"
    assert "| the same, in its cell without py-spy | 700 |" in lines
    assert "| ranking (Pipeline.rank: segment, threshold, top-k) | 300 (38%) |" in lines
    assert "| **the transformer's CPU per request** | **800** |" in lines
    assert "| the Python HTTP floor's, at the same clients | 100 (x8.0) |" in lines


def test_each_threads_cpu_is_split_by_its_own_samples():
    folded = (f"thread (100): MainThread;{OUTER};Pipeline.rank (transformer/pipeline.py:89) 3\n"
              f"thread (100): MainThread;{OUTER} 1\n"
              "thread (7): Thread-1 (_poll);_bootstrap (threading.py:1002);_bootstrap_inner (threading.py:1045);"
              "run (threading.py:982) 2\n")
    samples = thread_samples(folded)
    assert samples == {100: {"rank": 3, "kserve": 1}, 7: {"hop": 2}}
    # The loop spent 0.8 s, gRPC's thread 0.5 s, a thread never caught running 0.1 s.
    stages = split_cpu({100: 0.8, 7: 0.5, 9: 0.1}, samples)
    assert stages == pytest.approx({"rank": 0.6, "kserve": 0.2, "hop": 0.5, "rest": 0.1})


def test_py_spy_names_methods_with_or_without_their_class():
    assert stage_of(OUTER + ";scale (transformer/pipeline.py:84)") == "scale"
    assert stage_of(OUTER + ";answer (transformer/protocols/v1.py:266)") == "encode"
    assert stage_of(OUTER + ";rows (transformer/protocols/v2.py:338)") == "parse"
    assert stage_of(OUTER + ";predict (transformer/model.py:254)") == "hop"
    assert stage_of(OUTER + ";scale (transformer/steps/kernels.py:84)") == "kserve"  # not the pipeline's


def test_a_function_is_claimed_with_its_file_not_by_its_name_alone():
    # a kernel's __call__ under the fast path's __call__ is the scaling's, not the parser's
    assert stage_of(OUTER + ";scale (transformer/pipeline.py:84);__call__ (transformer/steps/kernels.py:70)") == "scale"
    assert stage_of(OUTER + ";__call__ (transformer/steps/kernels.py:70)") == "kserve"
    assert stage_of(OUTER + ";rows (transformer/protocols/v2.py:338)") == "parse"
    assert stage_of(OUTER + ";rows (transformer/store/versions.py:12)") == "kserve"


def test_a_kept_run_is_split_again_by_todays_rules():
    from scripts.benchmark.budget import restaged

    folded = (f"thread (100): MainThread;{OUTER};scale (transformer/pipeline.py:84);__call__ "
              "(transformer/steps/kernels.py:70) 3\n"
              f"thread (100): MainThread;{OUTER} 1\n"
              "thread (7): Thread-1;_bootstrap (threading.py:1002);_bootstrap_inner (threading.py:1045);"
              "run (threading.py:982) 2\n")
    old = {"target": "b", "concurrency": 1, "cpu_us": 900.0, "threads": {"loop": 800.0, "7": 100.0},
           "stages": {stage: {"samples": 0, "share": 0.0, "us": 0.0} for stage, _ in STAGES}}
    again = restaged(old, folded)
    assert again["stages"]["scale"]["us"] == pytest.approx(600.0) and again["stages"]["kserve"]["us"] == pytest.approx(200.0)
    assert again["stages"]["hop"]["us"] == pytest.approx(100.0) and again["cpu_us"] == 900.0
    assert sum(cell["share"] for cell in again["stages"].values()) == pytest.approx(1.0)


def test_samples_with_a_frame_name_torn_while_sampled_are_still_read(tmp_path):
    """py-spy samples without pausing the process, so a frame's name can be read half-written: bytes that are not
    UTF-8. That one frame reads as U+FFFD; every other sample counts as before."""
    from collections import Counter

    from scripts.benchmark.budget import read_samples, thread_samples

    raw = tmp_path / "samples.txt"
    raw.write_bytes(b"thread (7): MainThread;run (asyncio/runners.py:118);rank (transformer/pipeline.py:80) 3\n"
                    b"thread (7): MainThread;run (asyncio/runners.py:118);f\xf9\xfe (transformer/model.py:1) 2\n")
    text = read_samples(raw)
    assert "\ufffd" in text
    assert thread_samples(text) == {7: Counter({"rank": 3, "kserve": 2})}
