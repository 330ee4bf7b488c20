"""``python -m transformer`` in process: each flag reaches the model it configures, bad flags stop it with a
message naming them (exit 2), and the start-up check of TF Serving's metadata against each bundle. The
server itself is not started here (``serve`` is replaced); tests/test_reliability.py starts the real one."""

import asyncio
import logging
import re

import pytest
from small_bundle import TFServing, new_version, signature, write

import transformer.serving.server
from transformer import __main__ as cli
from transformer.store.bundle import bundle_dir, sha256_of
from transformer.predictor import Contract

DIGEST = "ab" * 32
REAL_SERVE = transformer.serving.server.serve  # the fixture below replaces it


@pytest.fixture(autouse=True)
def logger_restored():
    """main() points the transformer's logger at stdout and stops its propagation: undo that for later tests."""
    logger = logging.getLogger("transformer")
    saved = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


@pytest.fixture
def store(tmp_path):
    write(new_version(tmp_path, 4))
    return tmp_path / "embedder"


@pytest.fixture
def started(monkeypatch):
    """What main() would serve: (model, args), instead of starting the server; TF Serving not reachable."""
    seen = {}
    monkeypatch.setattr(transformer.serving.server, "serve", lambda model, args: seen.update(model=model, args=args))
    return seen


def base(store, *more):
    return ["--model_name", "embedder", "--predictor_host", "127.0.0.1:9", "--model_base_path", str(store), *more]


def test_defaults_reach_the_model(store, started):
    assert cli.main(base(store)) == 0
    assert not asyncio.get_event_loop_policy().get_event_loop().is_closed()  # the start-up check's is; KServe needs one
    model, args = started["model"], started["args"]
    assert (model.name, model.model_base_path, model._predictor_host) == ("embedder", store, "127.0.0.1:9")
    assert (model._predictor_api, model._predictor_grpc_port, model._predictor_timeout) == ("auto", 9000, 5.0)
    assert (model._predictor_rest_client, model._predictor_rest_rows) == ("loop", 64)
    assert model._retry.attempts == 3 and model.max_rows == 1024 and model.kernels == "numpy"
    assert (model.coalesce_inflight, model.coalesce_rows, model.full_scores, model.offload_rows) == (2, 256, False, 0)
    assert (model.keep_versions, model.poll_seconds, model.trusted_manifests, model.drift_window) == (
        2, 1.0, frozenset(), 2000)
    admission = model.admission
    assert (admission.max_requests, admission.max_rows, admission.default_timeout, admission.min_requests,
            admission.latency_budget) == (256, 8192, 10.0, 32, 0.05)
    assert (args.max_body_bytes, args.graceful_shutdown_seconds, args.access_log, args.log_level) == (
        8 * 1024 * 1024, 20, False, "INFO")
    assert sorted(model.versions.loaded) == [4]


def test_every_flag_reaches_the_model(store, started):
    digest = sha256_of(bundle_dir(store / "4") / "manifest.json")
    code = cli.main(base(store, "--predictor_api", "rest", "--predictor_grpc_port", "9100", "--predictor_timeout", "2.5",
                         "--predictor_retries", "0", "--max_rows", "64", "--kernels", "sklearn", "--coalesce_inflight",
                         "0", "--coalesce_rows", "32", "--full_scores", "--offload_rows", "128", "--model_versions", "3",
                         "--model_poll_seconds", "0.5", "--trusted_manifests", f" {digest.upper()} ,{DIGEST}", "--drift_window",
                         "500", "--max_inflight", "40", "--max_inflight_rows", "999", "--request_timeout", "3",
                         "--min_inflight", "8", "--latency_budget_ms", "20", "--max_body_bytes", "4096",
                         "--graceful_shutdown_seconds", "7"))
    assert code == 0
    model, args = started["model"], started["args"]
    assert (model._predictor_api, model._predictor_grpc_port, model._predictor_timeout) == ("rest", 9100, 2.5)
    assert model._retry.attempts == 1 and model.max_rows == 64 and model.kernels == "sklearn"
    assert (model.coalesce_inflight, model.coalesce_rows, model.full_scores, model.offload_rows) == (0, 32, True, 128)
    assert (model.keep_versions, model.poll_seconds, model.trusted_manifests, model.drift_window) == (
        3, 0.5, frozenset({digest, DIGEST}), 500)
    admission = model.admission
    assert (admission.max_requests, admission.max_rows, admission.default_timeout, admission.min_requests,
            admission.latency_budget) == (40, 999, 3.0, 8, 0.02)
    assert (args.max_body_bytes, args.graceful_shutdown_seconds) == (4096, 7)


def test_trusted_digests_come_from_the_environment_too(store, started, monkeypatch):
    monkeypatch.setenv(cli.TRUSTED_ENV, DIGEST)
    # the manifest's digest is not among them: the one version is refused, so nothing can start
    assert cli.main(base(store)) == 2
    assert started == {}


@pytest.mark.parametrize("flags, message", [
    (["--model_name", "embedder"], "--predictor_host HOST[:PORT] is required (TF Serving's REST address; over gRPC, "
                                   "its host with --predictor_grpc_port)"),
    (["--workers", "2"], "--workers must be 1: KServe's multi-process mode loses the predictor configuration; "
                         "scale with replicas instead"),
    (["--max_rows", "0"], "--max_rows, --max_body_bytes and --predictor_timeout must be positive, "
                          "--predictor_retries >= 0"),
    (["--max_body_bytes", "0"], "--max_rows, --max_body_bytes and --predictor_timeout must be positive"),
    (["--predictor_timeout", "0"], "--max_rows, --max_body_bytes and --predictor_timeout must be positive"),
    (["--predictor_retries", "-1"], "--predictor_retries >= 0"),
    *[([flag, "0"], "--model_versions, --drift_window, --max_inflight, --min_inflight and --max_inflight_rows must "
                    "be at least 1; --model_poll_seconds, --request_timeout and --latency_budget_ms positive")
      for flag in ("--model_versions", "--drift_window", "--max_inflight", "--min_inflight", "--max_inflight_rows",
                   "--model_poll_seconds", "--request_timeout", "--latency_budget_ms")],
    *[([flag, "-1"], "--early_retry_wait_ms and --max_waiting not negative") for flag in ("--early_retry_wait_ms", "--max_waiting")],
    (["--predict_path", "starlette"], "argument --predict_path: invalid choice: 'starlette'"),
    (["--trusted_manifests", f"{DIGEST},abc,{'g' * 64}"], f"--trusted_manifests (or ${cli.TRUSTED_ENV}) takes sha256 "
                                                          f"digests (64 hex digits), got abc, {'g' * 64}"),
    (["--predictor_api", "thrift"], "argument --predictor_api: invalid choice: 'thrift'"),
    (["--kernels", "torch"], "argument --kernels: invalid choice: 'torch'"),
    (["--log_level", "VERBOSE"], "argument --log_level: invalid choice: 'VERBOSE'"),
])
def test_bad_flags_stop_with_a_message_naming_them(store, started, capsys, flags, message):
    argv = flags if flags[0] == "--model_name" else base(store, *flags)
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == 2 and message in capsys.readouterr().err and started == {}


def test_a_model_store_without_a_usable_bundle_exits_2(tmp_path, started, capsys):
    assert cli.main(base(tmp_path / "nothing")) == 2
    assert capsys.readouterr().err == (
        f"error: cannot load the artifact bundle: no model version under {tmp_path / 'nothing'} has a usable bundle "
        "(no numeric version folders there): run `python -m model.train`, and point --model_base_path at the folder "
        "TF Serving serves (it holds the version folders)\n")
    assert started == {}


CONTRACT = Contract("serving_default", "features", 2, {"embedding": ("DT_FLOAT", 3), "scores": ("DT_FLOAT", 3)})


def test_the_start_up_check_names_each_served_version_that_does_not_fit():
    tf_serving = TFServing(3, 4)
    closed = []

    async def close():
        closed.append(True)

    tf_serving.close = close
    tf_serving.metadata_by_version[4] = signature(5)
    five = Contract("serving_default", "features", 5, CONTRACT.outputs)
    problems = asyncio.run(cli.check_predictor(tf_serving, {3: five, 4: five, 5: CONTRACT}))
    assert problems == ["version 3: input 'features' is DT_FLOAT [-1, 2], the bundle expects DT_FLOAT [-1, 5]"]
    assert closed == [True]  # version 4 fits its own metadata; version 5 is not served: not checked


def test_an_unreachable_predictor_is_not_an_error_at_start_up(caplog):
    down = TFServing(4)
    down.unreachable = True
    assert asyncio.run(cli.check_predictor(down, {4: CONTRACT})) == []
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("transformer", "WARNING", "predictor not checked at start-up (connection refused); readiness stays false "
                                   "until it answers")]


def test_the_smallest_values_are_accepted(store, started):
    assert cli.main(base(store, "--max_rows", "1", "--max_body_bytes", "1", "--predictor_timeout", "0.5",
                         "--predictor_retries", "0", "--model_versions", "1", "--drift_window", "1",
                         "--max_inflight", "1", "--min_inflight", "1", "--max_inflight_rows", "1",
                         "--model_poll_seconds", "0.5", "--request_timeout", "0.5", "--latency_budget_ms", "0.5")) == 0
    assert started["model"].max_rows == 1


def our_flags() -> list:
    """The parser's actions of the transformer's own flags (KServe's come first, in their own groups)."""
    [group] = [g for g in cli.build_parser()._action_groups if g.title == "transformer"]
    return group._group_actions


def test_help_explains_the_transformers_own_flags(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as caught:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert caught.value.code == 0 and out.startswith("usage: python -m transformer ")
    words = " ".join(out.split())
    assert ("KServe transformer: quantile-scales raw user features, calls the TF Serving embedding model, assigns a "
            "segment and returns the best items.") in words
    section = words[words.index(" transformer: --model_base_path "):]
    for action in our_flags():  # each with its default, once: stated by its help, or added after it
        text = " ".join(action.help.split())
        assert text in section, action.dest
        if action.default not in (False, "") and "default" not in text.lower():
            assert f"{text} (default: " in section, action.dest
    assert "--max_rows MAX_ROWS rows accepted in one request (413 past it) (default: 1024)" in section


def test_the_readme_lists_every_flag_with_its_default_and_help(monkeypatch):
    """transformer/README.md's table of flags is the parser's: flag, default and the --help text, in order."""
    from scripts.localstack import ROOT

    monkeypatch.delenv(cli.TRUSTED_ENV, raising=False)
    lines = (ROOT / "transformer" / "README.md").read_text().splitlines()
    table = lines[lines.index("| flag | default | |") + 2:]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table[:table.index("")]]

    def shown(action):
        if action.dest == "trusted_manifests":
            return f"`${cli.TRUSTED_ENV}`"
        if action.default is False:
            return "off"
        return f"{action.default:g}" if isinstance(action.default, float) else str(action.default)

    assert rows == [[f"`{a.option_strings[0]}`", shown(a), a.help] for a in our_flags()]


@pytest.mark.parametrize("flag, value, reached", [
    ("--kernels", "numpy", lambda model: model.kernels == "numpy"),
    ("--predictor_api", "grpc", lambda model: model._predictor_api == "grpc"),
    *[("--log_level", level, lambda model, level=level: logging.getLogger("transformer").level == logging.getLevelName(level))
      for level in ("DEBUG", "INFO", "WARNING", "ERROR")],
])
def test_each_documented_choice_is_accepted(store, started, flag, value, reached):
    assert cli.main(base(store, flag, value)) == 0
    assert reached(started["model"])


def test_the_transformers_log_lines_go_to_stdout_timed_and_named(capsys):
    cli.configure_logging("INFO")
    logger = logging.getLogger("transformer")
    logger.info("started")
    logger.debug("not shown at INFO")
    out = capsys.readouterr()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO transformer started\n", out.out), out.out
    assert out.err == "" and logger.propagate is False and len(logger.handlers) == 1


def test_the_start_up_check_asks_tf_serving_once_quickly_and_says_a_misfit(store, started, monkeypatch, capsys):
    write(new_version(store.parent, 5))
    tf_serving = TFServing(4, 5)
    tf_serving.metadata_by_version.update({4: signature(5), 5: signature(5)})  # TF Serving's take 5 features
    made = []

    def connect(*args, **options):
        made.append((args, options))
        return tf_serving

    monkeypatch.setattr(cli, "connect", connect)
    assert cli.main(base(store, "--predictor_api", "rest", "--predictor_grpc_port", "9100")) == 0
    [(args, options)] = made
    assert args == ("rest", "127.0.0.1:9", "embedder")
    assert (options["grpc_port"], options["timeout"], options["retry"].attempts) == (9100, 3.0, 1)
    assert capsys.readouterr().err == (
        "warning: the predictor's model does not fit the bundle: version 4: input 'features' is DT_FLOAT [-1, 5], the "
        "bundle expects DT_FLOAT [-1, 2]; version 5: input 'features' is DT_FLOAT [-1, 5], the bundle expects "
        "DT_FLOAT [-1, 2]. Readiness stays false until it does. TF Serving and the transformer must read the same "
        "model base path (same storage URI).\n")
    # It serves, un-Ready, rather than exiting: a predictor being replaced would otherwise crash-loop it.
    assert started["model"].versions.loaded


# -- KServe's own flags: honoured with KServe's meaning, or refused naming ours ------------------------------------

@pytest.mark.parametrize("flags, timeout, attempts", [
    (["--predictor_request_timeout_seconds", "1"], 1.0, 3),
    (["--predictor_request_timeout_seconds", "1", "--predictor_timeout", "1"], 1.0, 3),
    (["--predictor_request_retries", "0"], 5.0, 1),
    (["--predictor_retries", "4", "--predictor_request_retries", "4"], 5.0, 5),
])
def test_kserves_predictor_timeout_and_retries_set_the_transformers_own(store, started, flags, timeout, attempts):
    assert cli.main(base(store, *flags)) == 0
    model, args = started["model"], started["args"]
    assert (model._predictor_timeout, model._retry.attempts) == (timeout, attempts)
    # KServe's own predictor configuration is built from the same values.
    assert (args.predictor_request_timeout_seconds, args.predictor_request_retries) == (timeout, attempts - 1)


@pytest.mark.parametrize("flags, message", [
    (["--predictor_protocol", "v2"], "--predictor_protocol v2: TF Serving speaks no Open Inference Protocol (v2), only "
                                     "its own v1 REST and gRPC APIs: leave --predictor_protocol out (or v1) and choose "
                                     "the API with --predictor_api rest or grpc"),
    (["--protocol", "grpc-v2"], "--predictor_protocol grpc-v2: TF Serving speaks no Open Inference Protocol"),
    (["--predictor_request_timeout_seconds", "1", "--predictor_timeout", "2"],
     "--predictor_request_timeout_seconds 1 and --predictor_timeout 2.0 disagree: they mean the same, give one"),
    (["--predictor_request_retries", "1", "--predictor_retries", "3"],
     "--predictor_request_retries 1 and --predictor_retries 3 disagree"),
    (["--workers", "2"], "--workers must be 1: KServe's multi-process mode loses the predictor configuration"),
])
def test_kserve_flags_that_cannot_mean_what_they_say_here_are_refused(store, started, capsys, flags, message):
    with pytest.raises(SystemExit) as refused:
        cli.main(base(store, *flags))
    assert refused.value.code == 2 and message in capsys.readouterr().err and not started


def test_the_predictor_protocol_v1_and_the_health_check_flag_are_accepted_as_they_are(store, started):
    assert cli.main(base(store, "--predictor_protocol", "v1", "--enable_predictor_health_check")) == 0
    assert started["args"].enable_predictor_health_check is True


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_predictor_use_ssl_calls_tf_serving_over_tls_on_either_api(store, started, api):
    from transformer.predictor import connect

    assert cli.main(base(store, "--predictor_api", api, "--predictor_use_ssl", "true")) == 0
    model = started["model"]
    model._predictor = None  # the real client, as the model makes it
    client = model.predictor
    assert (client.base_url.startswith("https://") if api == "rest" else client.use_ssl is True)
    plain = connect(api, "tf:8501", "embedder")
    assert (plain.base_url.startswith("http://") if api == "rest" else plain.use_ssl is False)


def fake_model_server(monkeypatch) -> dict:
    """serve() with KServe's ModelServer replaced: what it was made with, the models it was started with and the
    event loop policy in force then (nothing else of serve()'s is run: the routes, gc.freeze)."""
    import asyncio

    import transformer.serving.server as server

    made = {}

    class FakeModelServer:
        def __init__(self, **kwargs):
            made.update(kwargs)
            self.dataplane = object()

        def start(self, models):
            made["started"], made["policy"] = models, type(asyncio.get_event_loop_policy())

    monkeypatch.setattr(server, "ModelServer", FakeModelServer)
    monkeypatch.setattr(server, "install", lambda *a, **k: None)
    monkeypatch.setattr(server.gc, "freeze", lambda: None)
    return made


def test_kserves_server_flags_reach_its_model_server(monkeypatch, store, started):
    """--max_threads, --max_asyncio_workers, --ssl_certfile/--ssl_keyfile go to KServe's ModelServer; its logging
    and gRPC message flags to the settings it reads itself; the gRPC receive limit is the lower of its flag and
    --max_body_bytes."""
    from kserve import model_server

    assert cli.main(base(store, "--max_threads", "7", "--max_asyncio_workers", "3", "--ssl_certfile", "/tls/crt",
                         "--ssl_keyfile", "/tls/key", "--grpc_max_send_message_length", "1000",
                         "--grpc_max_receive_message_length", "2048", "--max_body_bytes", "4096",
                         "--configure_logging", "false", "--timeout-keep-alive", "30")) == 0
    args = started["args"]
    made = fake_model_server(monkeypatch)
    saved = vars(model_server.args).copy()
    try:
        REAL_SERVE(started["model"], args)
        assert {k: made[k] for k in ("max_threads", "max_asyncio_workers", "ssl_certfile", "ssl_keyfile",
                                     "timeout_keep_alive", "workers")} == {
            "max_threads": 7, "max_asyncio_workers": 3, "ssl_certfile": "/tls/crt", "ssl_keyfile": "/tls/key",
            "timeout_keep_alive": 30, "workers": 1}
        assert model_server.args.grpc_max_send_message_length == 1000
        assert model_server.args.grpc_max_receive_message_length == 2048  # lower than --max_body_bytes
        assert model_server.args.configure_logging is False
        assert made["started"] == [started["model"]]
    finally:
        vars(model_server.args).update(saved)


def test_the_event_loop_is_asyncios_own_unless_uvloop_is_asked_for(monkeypatch, store, started):
    """asyncio's loop by default (it accepts every waiting connection when a burst arrives; uvloop accepts one per
    turn of the loop, benchmarks/overload.md): the server is started on it, and uvloop's policy is set only when
    asked for, as KServe's --event-loop says."""
    import asyncio

    import uvloop
    from kserve import model_server

    assert cli.build_parser().parse_args(["--model_name", "m"]).event_loop == "asyncio"
    made = fake_model_server(monkeypatch)
    saved, policy = vars(model_server.args).copy(), asyncio.get_event_loop_policy()
    try:
        for given, loop, expected in (((), "asyncio", asyncio.DefaultEventLoopPolicy),
                                      (("--event-loop", "uvloop"), "uvloop", uvloop.EventLoopPolicy)):
            assert cli.main(base(store, *given)) == 0
            REAL_SERVE(started["model"], started["args"])
            assert (made["event_loop"], made["policy"]) == (loop, expected)
            asyncio.set_event_loop_policy(policy)
    finally:
        vars(model_server.args).update(saved)
        asyncio.set_event_loop_policy(policy)


def test_help_says_what_each_kserve_predictor_flag_does_here(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, meaning in cli.KSERVE_PREDICTOR_FLAGS.items():
        assert " ".join(meaning.split()) in text, flag
