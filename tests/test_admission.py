"""Admission control: excess requests get a fast 503 with Retry-After, queued work past its deadline is dropped."""

import asyncio
import contextvars
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import MODEL_NAME, assert_same_predictions
from fault_proxy import FaultProxy

from scripts.localstack import LocalStack
from transformer.serving.admission import Admission, Refused, deadline, rows_held
from transformer.serving.coalesce import Coalescer


def test_requests_and_rows_are_bounded_and_released():
    admission = Admission(max_requests=2, max_rows=10)

    def run(steps):
        ctx = contextvars.copy_context()
        return ctx.run(steps)

    def first():
        admission.enter(None)
        admission.take_rows(8)
        return rows_held.get()

    assert run(first) == 8 and (admission.requests, admission.rows) == (1, 8)

    def second():
        admission.enter("250")
        assert 0.2 < deadline.get() - time.monotonic() <= 0.25
        with pytest.raises(Refused, match=r"8 rows in progress, at most 10") as caught:
            admission.take_rows(3)
        assert (caught.value.status, caught.value.cause) == (503, "overloaded_rows")
        admission.take_rows(2)
        admission.take_rows(2)  # a second time (the version retry): counted once
        return admission.rows

    assert run(second) == 10 and admission.requests == 2
    with pytest.raises(Refused, match=r"2 requests in progress, at most 2 now") as caught:
        run(lambda: admission.enter(None))
    assert (caught.value.status, caught.value.cause) == (503, "overloaded_requests")

    def release():
        rows_held.set(8)
        admission.leave(0.01)

    run(release)
    assert (admission.requests, admission.rows) == (1, 2)


def answer_window(admission: Admission, seconds: float) -> None:
    """One window of requests admitted and answered, each after ``seconds`` inside."""
    from transformer.serving.admission import WINDOW

    for _ in range(WINDOW):
        contextvars.copy_context().run(lambda: (admission.enter(None), admission.leave(seconds)))


def test_the_request_limit_follows_the_latency_of_admitted_requests():
    admission = Admission(max_requests=100, min_requests=10, latency_budget=0.05)
    assert admission.limit == 100
    limits = []
    for _ in range(12):  # slower than the budget: down by a fifth per window, to the floor and no lower
        answer_window(admission, 0.08)
        limits.append(admission.limit)
    assert limits[:4] == [80, 64, 51, 40] and limits[-1] == 10 and min(limits) == 10
    answer_window(admission, 0.04)  # within the budget but above half of it: held
    assert admission.limit == 10
    for expected in (11, 12, 13):  # well within it: up by an eighth (at least one) per window
        answer_window(admission, 0.01)
        assert admission.limit == expected
    for _ in range(60):
        answer_window(admission, 0.01)
    assert admission.limit == 100  # and no higher than the ceiling
    assert Admission(max_requests=4).min_requests == 4  # the floor never exceeds the ceiling


def test_a_request_finding_the_limit_reached_is_refused_at_once():
    admission = Admission(max_requests=40, min_requests=8)
    for _ in range(3):
        answer_window(admission, 1.0)
    assert admission.limit == 20  # 40 -> 32 -> 25 -> 20
    ctx = [contextvars.copy_context() for _ in range(21)]
    for c in ctx[:20]:
        c.run(lambda: admission.enter(None))
    assert admission.full()
    with pytest.raises(Refused, match=r"20 requests in progress, at most 20 now"):
        ctx[20].run(lambda: admission.enter(None))


class Clock:
    """time.monotonic for the admission module, moved by the test."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


def refuse(admission: Admission, n: int) -> list[int]:
    """The Retry-After told to ``n`` requests refused for being over the request limit."""
    return [admission.refusal().retry_after for _ in range(n)]


def test_refused_clients_are_told_to_wait_longer_the_more_of_them_there_are(monkeypatch):
    from transformer.serving import admission as module

    clock = Clock()
    monkeypatch.setattr(module, "time", clock)
    admission = Admission()

    def second(refused: int, answered: int) -> list[int]:
        """One second of traffic: the waits told, the last refusal after the second has passed."""
        waits = refuse(admission, refused - 1)
        for _ in range(answered):
            contextvars.copy_context().run(lambda: (admission.enter(None), admission.leave(0.01)))
        clock.now += 1.0
        return waits + refuse(admission, 1)

    assert second(0 + 1, 100)[-1] == 1  # one refusal per 100 answers: come back after a second
    assert admission.retry_after == 1
    # 500 refusals a second, each client told 1 s: about 500 clients waiting; against 400 answers a second,
    # a quarter of that is 100 retries a second: 5 s.
    told = second(500, 400)
    assert set(told[:-1]) == {1} and admission.retry_after == 5
    told = refuse(admission, 18)
    assert sorted(told[:9]) == list(range(1, 10)) and told[9:] == told[:9]  # 1 .. 9 in turn: a mean of 5
    after = told[-1] % 9 + 1
    assert f"retry after {after}s" in str(admission.refusal())
    # the same clients now retry every 5 s (100 refusals a second): the wait holds
    second(100 - 19, 400)
    assert admission.retry_after == 5
    second(100, 401)  # 100 x 5 / (0.25 x 401) = 4.99: rounded up
    assert admission.retry_after == 5
    second(1000, 100)  # far more clients than answers: a mean of 5 s at most ...
    assert admission.retry_after == 5
    assert max(refuse(admission, 20)) == 9  # ... and nobody is told more than 9 s
    second(21 - 20, 0)  # 21 a second x 5 s = 105 clients, over 100 retries a second even with no answers: 2 s
    assert admission.retry_after == 2
    second(50, 0)  # 100 clients: their retries cost next to nothing, whatever is answered (100 a second)
    assert admission.retry_after == 1 and refuse(admission, 3) == [1, 1, 1]


def test_the_wait_is_not_recomputed_within_a_second(monkeypatch):
    from transformer.serving import admission as module

    clock = Clock()
    monkeypatch.setattr(module, "time", clock)
    admission = Admission()
    refuse(admission, 1000)
    clock.now += 0.999
    refuse(admission, 1)
    assert admission.retry_after == 1
    clock.now += 0.001  # 1002 refusals in 1.0 s, against 100 retries a second: 10.02 -> the cap
    refuse(admission, 1)
    assert admission.retry_after == 5


def test_a_refusal_for_rows_tells_the_same_wait():
    admission = Admission(max_rows=10)
    admission.retry_after = 3
    contextvars.copy_context().run(lambda: (admission.enter(None), admission.take_rows(10)))
    with pytest.raises(Refused, match=r"retry after 2s$") as caught:
        contextvars.copy_context().run(lambda: (admission.enter(None), admission.take_rows(1)))
    assert caught.value.retry_after == 2


@pytest.mark.parametrize("field", ["max_requests", "max_rows", "min_requests", "default_timeout", "latency_budget"])
def test_bounds_that_admit_nothing_are_refused_and_the_smallest_ones_accepted(field):
    smallest = {"max_requests": 1, "max_rows": 1, "min_requests": 1, "default_timeout": 0.001, "latency_budget": 0.001}
    with pytest.raises(ValueError, match=r"^max_requests, max_rows and min_requests must be at least 1; "
                                         r"default_timeout and latency_budget positive$"):
        Admission(**{**smallest, field: 0})
    admission = Admission(**smallest)
    assert (admission.limit, admission.min_requests) == (1, 1)


def test_the_deadline_is_the_header_in_milliseconds_up_to_an_hour():
    def deadline_after(header):
        admission = Admission()
        return contextvars.copy_context().run(lambda: (admission.enter(header), deadline.get() - time.monotonic())[1])

    assert 99.95 < deadline_after("100000") <= 100.0
    assert 3599.9 < deadline_after("3599999") <= 3600.0
    long = "1" * 30 + "x" * 20
    for header in ("3600000", long):
        with pytest.raises(Refused) as caught:
            deadline_after(header)
        assert (caught.value.status, caught.value.cause) == (400, "invalid_timeout")
    assert repr(long[:40]) in str(caught.value) and repr(long[:41]) not in str(caught.value)


def test_the_limit_reads_the_p90_of_a_window_and_its_exact_edges():
    budget = 0.05
    admission = Admission(max_requests=100, min_requests=10, latency_budget=budget)
    from transformer.serving.admission import WINDOW

    def window(latencies):
        for seconds in latencies:
            contextvars.copy_context().run(lambda: (admission.enter(None), admission.leave(seconds)))

    slow_tail = [0.001] * (WINDOW - 4) + [1.0] * 4  # the p90 (28th of 32, sorted) is a slow one
    window(slow_tail)
    assert admission.limit == 80
    window([budget] * WINDOW)  # at the budget, not past it: held
    assert admission.limit == 80
    window([budget / 2] * WINDOW)  # at half the budget, not under it: held
    assert admission.limit == 80
    window([0.02] * WINDOW)  # under half the budget: grows by an eighth
    assert admission.limit == 90
    assert admission.requests == 0 and admission.rows == 0


def test_leaving_forgets_the_rows_so_the_same_context_counts_its_next_request():
    admission = Admission(max_rows=100)

    def twice():
        admission.enter(None)
        admission.take_rows(3)
        admission.leave(0.01)
        assert rows_held.get() == 0
        admission.enter(None)
        admission.take_rows(5)  # counted: the first request's rows were released
        assert admission.rows == 5
        admission.leave(0.01)
        admission.enter(None)  # a request refused before it had rows: leaving releases none
        admission.leave(0.01)

    contextvars.copy_context().run(twice)
    assert (admission.requests, admission.rows) == (0, 0)


def test_check_deadline_drops_only_work_whose_deadline_has_passed():
    from transformer.serving.admission import check_deadline

    def at(limit):
        deadline.set(limit)
        check_deadline("the predictor call")

    contextvars.copy_context().run(at, None)  # no deadline
    contextvars.copy_context().run(at, time.monotonic() + 60)
    with pytest.raises(Refused, match=r"^the request's deadline passed before the predictor call; nothing more "
                                      r"was computed for it$") as caught:
        contextvars.copy_context().run(at, time.monotonic() - 0.001)
    assert (caught.value.status, caught.value.cause) == (504, "deadline_exceeded")


def test_a_request_larger_than_the_row_bound_is_served_when_alone():
    admission = Admission(max_requests=4, max_rows=10)
    contextvars.copy_context().run(lambda: (admission.enter(None), admission.take_rows(50)))
    assert admission.rows == 50


@pytest.mark.parametrize("value", ["soon", "-5", "0", "1e12"])
def test_a_bad_timeout_header_is_a_client_error(value):
    with pytest.raises(Refused, match="x-request-timeout-ms must be a number of milliseconds") as caught:
        Admission().enter(value)
    assert caught.value.status == 400


def test_the_coalescer_drops_waiting_work_past_its_deadline():
    sent = []

    async def call(features, deadline=None):
        sent.append(features.shape[0])
        await asyncio.sleep(0.05)
        return {"y": features}

    async def scenario():
        coalescer = Coalescer(call, max_inflight=1, max_rows=100)
        now = time.monotonic()
        first = asyncio.create_task(coalescer(np.ones((1, 2))))
        await asyncio.sleep(0)
        late = asyncio.create_task(coalescer(np.ones((2, 2)), now + 0.01))  # expires while it waits
        fine = asyncio.create_task(coalescer(np.ones((3, 2)), now + 10))
        results = await asyncio.gather(first, late, fine, return_exceptions=True)
        return results

    first, late, fine = asyncio.run(scenario())
    assert first["y"].shape == (1, 2) and fine["y"].shape == (3, 2)
    assert isinstance(late, Refused) and (late.status, late.cause) == (504, "deadline_exceeded")
    assert sent == [1, 3]  # the expired request's rows never reached the predictor


@pytest.fixture(scope="module")
def slow(stack, tmp_path_factory):
    """A transformer with a small admission bound, before a predictor that answers after 0.8 s."""
    proxy = FaultProxy(stack.predictor_url).start()
    transformer = LocalStack(build=stack.build, predictor_port=proxy.port, log_dir=tmp_path_factory.mktemp("slow"),
                             transformer_args=["--predictor_api", "rest", "--max_inflight", "4", "--coalesce_inflight", "1",
                                               "--predictor_timeout", "5"])
    transformer.start_transformer()
    yield proxy, transformer.transformer_url
    transformer.stop()
    proxy.close()


def post_all(url, bodies, headers=None):
    results = [None] * len(bodies)

    def send(i):
        started = time.monotonic()
        response = httpx.post(url, json=bodies[i], headers=headers or {}, timeout=30)
        results[i] = (response, started, time.monotonic())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def metric(base, line_start):
    text = httpx.get(f"{base}/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


@pytest.mark.heavy
def test_excess_requests_get_503_at_once_and_the_admitted_ones_are_served(slow, raw_users, offline):
    proxy, base = slow
    url = f"{base}/v1/models/{MODEL_NAME}:predict"
    shed_before = metric(base, 'embedder_requests_total{cause="overloaded_requests"')
    proxy.mode = ("delay", 0.8)
    try:
        results = post_all(url, [{"instances": raw_users[i:i + 1].tolist()} for i in range(12)])
    finally:
        proxy.mode = ("forward",)
    ok = [r for r in results if r[0].status_code == 200]
    refused = [r for r in results if r[0].status_code == 503]
    assert len(ok) == 4 and len(refused) == 8, [r[0].status_code for r in results]
    for response, _, _ in refused:
        # 8 clients refused: too few for a wait longer than a second (admission.RETRIES_ALWAYS_FINE)
        assert response.headers["retry-after"] == "1" and len(response.headers["x-request-id"]) == 32
        assert response.json()["error"] == ("the transformer is at capacity (4 requests in progress, at most 4 "
                                            "now); retry after 1s")
    # Refused before the slow predictor had answered anyone: nobody waited for it.
    assert max(done for _, _, done in refused) < min(done for _, _, done in ok)
    assert metric(base, 'embedder_requests_total{cause="overloaded_requests"') - shed_before == 8
    assert metric(base, "embedder_inflight_requests{") == 0 and metric(base, "embedder_inflight_rows{") == 0
    again = httpx.post(url, json={"instances": raw_users[:3].tolist()}, timeout=30)  # full service at once
    assert again.status_code == 200
    assert [p["segment"] for p in again.json()["predictions"]] == [p["segment"] for p in offline.predictions(raw_users[:3])]


@pytest.mark.heavy
def test_requests_waiting_for_the_predictor_are_merged_and_each_gets_its_own_rows(slow, raw_users, offline):
    """One call in flight (--coalesce_inflight 1): two requests of 3 and 2 rows that arrive while it runs
    go to the predictor together, as one call of 5 rows, and each answer holds its own rows."""
    proxy, base = slow
    url = f"{base}/v1/models/{MODEL_NAME}:predict"
    calls, rows_sum = proxy.requests, metric(base, "embedder_predictor_call_rows_sum{")
    calls_counted = metric(base, "embedder_predictor_call_rows_count{")
    parts = {"a": raw_users[:1], "b": raw_users[1:4], "c": raw_users[4:6]}
    answers = {}

    def send(name):
        answers[name] = httpx.post(url, json={"instances": parts[name].tolist()}, timeout=30)

    proxy.mode = ("delay", 1.0)
    try:
        first = threading.Thread(target=send, args=("a",))
        first.start()
        deadline = time.monotonic() + 10
        while proxy.requests == calls:  # a's call has reached the predictor and waits there
            assert time.monotonic() < deadline, "the first request never reached the predictor"
            time.sleep(0.005)
        others = [threading.Thread(target=send, args=(name,)) for name in ("b", "c")]
        for t in others:
            t.start()
        for t in [first, *others]:
            t.join(30)
    finally:
        proxy.mode = ("forward",)
    for name, rows in parts.items():
        assert answers[name].status_code == 200, answers[name].text
        assert_same_predictions(answers[name].json()["predictions"], offline.predictions(rows))
    assert proxy.requests - calls == 2  # a alone, then b and c together
    assert metric(base, "embedder_predictor_call_rows_count{") - calls_counted == 2
    assert metric(base, "embedder_predictor_call_rows_sum{") - rows_sum == 6


@pytest.mark.heavy
def test_queued_work_past_its_deadline_is_dropped_not_computed(slow, raw_users):
    proxy, base = slow
    url = f"{base}/v1/models/{MODEL_NAME}:predict"
    before = proxy.requests
    proxy.mode = ("delay", 0.8)
    try:  # one call in flight at a time: the second and third wait, and their 300 ms pass meanwhile
        results = post_all(url, [{"instances": raw_users[i:i + 1].tolist()} for i in range(3)],
                           headers={"x-request-timeout-ms": "300"})
    finally:
        proxy.mode = ("forward",)
    statuses = sorted(r[0].status_code for r in results)
    assert statuses == [200, 504, 504], statuses
    dropped = [r[0].json()["error"] for r in results if r[0].status_code == 504]
    assert all("deadline passed while it waited for the predictor; it was not sent" in e for e in dropped)
    assert proxy.requests - before == 1  # only the first request's rows reached the predictor
    bad = httpx.post(url, json={"instances": raw_users[:1].tolist()}, headers={"x-request-timeout-ms": "soon"})
    assert bad.status_code == 400 and "x-request-timeout-ms" in bad.json()["error"]


def test_a_client_that_comes_back_before_its_retry_after_waits_before_it_is_answered():
    """Refused once and told to wait, a connection that re-sends at once is paced: its next request waits
    ``early_retry_wait`` (nothing computed for it), then is admitted if there is room or refused again."""
    async def scenario():
        admission = Admission(max_requests=1, min_requests=1, early_retry_wait=0.05)
        admission.enter(None, client=("10.0.0.1", 1))  # the one slot taken
        started = time.monotonic()
        with pytest.raises(Refused, match="at capacity"):
            await admission.admit(None, ("10.0.0.2", 2))  # first refusal: at once
        assert time.monotonic() - started < 0.04 and admission.came_back_early(("10.0.0.2", 2))
        assert not admission.came_back_early(("10.0.0.2", 3))  # another connection of the same host: not paced
        started = time.monotonic()
        with pytest.raises(Refused, match="at capacity"):
            await admission.admit(None, ("10.0.0.2", 2))  # back at once: waited, then refused again
        assert time.monotonic() - started >= 0.05 and admission.waiting == 0

        async def free_the_slot():
            while admission.waiting == 0:  # once the request waits, an answer leaves
                await asyncio.sleep(0)
            admission.leave(0.01)

        freeing = asyncio.get_running_loop().create_task(free_the_slot())
        await admission.admit(None, ("10.0.0.2", 2))  # back at once again: room came during its wait, admitted
        await freeing
        assert (admission.requests, admission.waiting) == (1, 0)

    contextvars.copy_context().run(asyncio.run, scenario())


def test_pacing_waits_no_longer_than_the_deadline_and_no_more_than_max_waiting_wait():
    async def scenario():
        admission = Admission(max_requests=1, min_requests=1, early_retry_wait=60.0, max_waiting=1)
        admission.enter(None)
        with pytest.raises(Refused):
            admission.enter(None, client="a")
        with pytest.raises(Refused):
            admission.enter(None, client="b")
        started = time.monotonic()
        with pytest.raises(Refused):
            await admission.admit("30", "a")  # its own deadline, 30 ms, is sooner than the wait
        assert time.monotonic() - started < 5
        waiting = asyncio.get_running_loop().create_task(admission.admit(None, "a"))
        while admission.waiting == 0:
            await asyncio.sleep(0)
        assert admission.waiting == 1 and not admission.paces("b")  # one waits: as many as may
        started = time.monotonic()
        with pytest.raises(Refused):
            await admission.admit(None, "b")  # refused at once
        assert time.monotonic() - started < 5
        waiting.cancel()  # the client went away while it waited: nothing held
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert (admission.requests, admission.waiting) == (1, 0)

    contextvars.copy_context().run(asyncio.run, scenario())


def test_clients_are_forgotten_once_their_wait_is_over(monkeypatch):
    import transformer.serving.admission as module

    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])

    def scenario():  # in a context of its own: the deadlines set here must not reach other tests
        admission = Admission(max_requests=1, min_requests=1)
        admission.enter(None)
        with pytest.raises(Refused) as caught:
            admission.enter(None, client="a")
        assert caught.value.retry_after == 1 and admission.came_back_early("a")  # told 1 s
        now[0] += 0.5
        assert admission.came_back_early("a")
        now[0] += 0.6
        assert not admission.came_back_early("a")  # its wait is over: it honoured it, a fast 503 again
        assert "a" in admission._told
        with pytest.raises(Refused):
            admission.enter(None, client="b")  # the once-a-second bookkeeping forgets the expired ones
        assert "a" not in admission._told and "b" in admission._told
        assert not admission.came_back_early(None)  # no address (gRPC, a test client): never paced

    contextvars.copy_context().run(scenario)


def test_waiting_bounds_below_zero_are_refused():
    for field in ("early_retry_wait", "max_waiting"):
        with pytest.raises(ValueError, match=r"^early_retry_wait and max_waiting must not be negative \(0: refuse "
                                             r"at once\)$"):
            Admission(**{field: -1})
    assert not Admission(early_retry_wait=0).paces(None)


@pytest.mark.heavy
def test_a_storm_of_clients_that_ignore_retry_after_is_answered_and_paced(slow, raw_users, offline):
    """64 connections that re-send the moment they are answered, 503s included, against a bound of 4 and a
    predictor slowed to 0.2 s: every request gets 200, 503 or 504 and none is lost; each connection is refused
    once at once and afterwards at most once per --early_retry_wait_ms (500 ms), so the refusals stay a bounded
    count instead of as many as the process can write; the transformer serves normally afterwards."""
    from scripts.loadgen import run_recorded

    proxy, base = slow
    url = f"{base}/v1/models/{MODEL_NAME}:predict"
    body = json_bytes({"instances": raw_users[:1].tolist()})
    shed_before = metric(base, 'embedder_requests_total{cause="overloaded_requests"')
    proxy.mode = ("delay", 0.2)
    try:
        run = run_recorded(url, body, 64, 3.0, honour_retry_after=False, max_requests=5000)
    finally:
        proxy.mode = ("forward",)
    statuses = run["statuses"]
    counts = {int(code): int((statuses == code).sum()) for code in np.unique(statuses)}
    assert set(counts) <= {200, 503, 504} and run["transport_errors"] == 0, counts
    assert counts.get(200, 0) > 0 and counts.get(503, 0) > 0, counts
    # one refusal at once per connection, then one per paced wait at most (3 s / 0.5 s), and the last in flight
    assert counts[503] <= 64 * (1 + 3.0 / 0.5 + 1), counts
    assert metric(base, 'embedder_requests_total{cause="overloaded_requests"') - shed_before == counts[503]
    deadline = time.monotonic() + 10
    while metric(base, "embedder_inflight_requests{") != 0:  # the last answers are on their way
        assert time.monotonic() < deadline, "requests were left counted inside the transformer"
        time.sleep(0.05)
    assert metric(base, "embedder_inflight_rows{") == 0
    again = httpx.post(url, json={"instances": raw_users[:3].tolist()}, timeout=30)  # full service at once
    assert again.status_code == 200
    assert [p["segment"] for p in again.json()["predictions"]] == [p["segment"] for p in offline.predictions(raw_users[:3])]


def json_bytes(doc) -> bytes:
    import json

    return json.dumps(doc).encode()


def test_a_paced_client_that_left_during_its_wait_is_not_admitted():
    """When a storm ends, its clients' paced requests wake up with nobody waiting for them: asked after the
    wait, a client that has gone is answered 499 and takes no slot from the first new clients."""
    async def scenario():
        admission = Admission(max_requests=1, min_requests=1, early_retry_wait=0.01)
        admission.enter(None)  # full
        for client in ("a", "c"):
            with pytest.raises(Refused):
                admission.enter(None, client=client)  # refused once, told to wait
        asked = []

        async def gone():
            asked.append("gone")
            admission.leave(0.01)  # room came during its wait: it would be admitted, were it still there
            return False

        with pytest.raises(Refused) as caught:
            await admission.admit(None, "a", gone)
        assert (caught.value.status, caught.value.cause) == (499, "client_disconnected")
        assert str(caught.value) == ("the client closed the connection while its request waited; nothing was computed "
                                     "for it")
        assert asked == ["gone"] and (admission.requests, admission.waiting) == (0, 0)

        async def there():
            asked.append("there")
            return True

        await admission.admit(None, "b", there)  # room, not paced: not asked, admitted
        assert asked == ["gone"] and admission.requests == 1
        with pytest.raises(Refused, match="at capacity"):
            await admission.admit(None, "c", there)  # paced, still there, still no room: refused as before
        assert asked == ["gone", "there"] and admission.requests == 1

    contextvars.copy_context().run(asyncio.run, scenario())


def test_what_admission_remembers_of_refused_clients_and_when_it_paces_them(monkeypatch):
    import transformer.serving.admission as admission_module

    admission = Admission(max_requests=1, min_requests=1)
    admission.refusal(None)
    assert None not in admission._told  # a request without a known client is told, not remembered
    monkeypatch.setattr(admission_module, "MAX_TOLD", 2)
    for client in ("a", "b", "c"):
        admission.refusal(client)
    assert set(admission._told) == {"a", "b"}  # at most MAX_TOLD at once
    never = Admission(max_requests=1, min_requests=1, early_retry_wait=0.0)
    never.refusal("a")
    assert never.came_back_early("a") and not never.paces("a")  # a wait of 0: refused at once, never paced
    no_room = Admission(max_requests=1, min_requests=1, max_waiting=0)  # accepted: nobody waits
    no_room.refusal("a")
    assert no_room.came_back_early("a") and not no_room.paces("a")
