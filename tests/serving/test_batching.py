"""The continuous-batching engine without HTTP: token-identical greedy answers per
adapter however requests arrive, joins between steps, per-request sampling, stop
strings, cancellation, back-pressure."""

from __future__ import annotations

import queue
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.serving.conftest import PROMPTS, Reference, wait_until
from tunesmith.serving.types import SamplingParams, ServingError


class Collector:
    """A sink per choice that keeps every event."""

    def __init__(self) -> None:
        self.events: dict[int, list[tuple[str, Any]]] = {}
        self.done = threading.Event()
        self.q: "queue.Queue[tuple[int, str, Any]]" = queue.Queue()

    def __call__(self, index: int) -> Any:
        def sink(kind: str, payload: Any) -> None:
            self.events.setdefault(index, []).append((kind, payload))
            self.q.put((index, kind, payload))
        return sink

    def final(self, index: int = 0) -> Any:
        evs = self.events.get(index, [])
        return evs[-1] if evs and evs[-1][0] in ("done", "error") else None

    def deltas(self, index: int = 0) -> str:
        return "".join(p for k, p in self.events.get(index, []) if k == "delta")


def submit(server: Any, model: str, ids: list[int], *, stream: bool = False, n: int = 1, **params: Any) -> tuple[list, Collector]:
    c = Collector()
    seqs = server.submit(model, [ids], SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **params}), n=n,
                         stream=stream, sink_for=c)
    return seqs, c


def finish(seqs: list, timeout: float = 60.0) -> None:
    wait_until(lambda: all(s.done for s in seqs), timeout, "sequences to finish")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_runs: dict[str, Path]) -> Any:
    from tunesmith.serving.server import ModelServer

    s = ModelServer.from_paths(tiny_model_dir, {"alpha": adapter_runs["alpha"], "beta": adapter_runs["beta"]},
                               max_batch_size=16, max_wait_ms=2)
    yield s
    s.close()


def test_staggered_mixed_requests_equal_each_adapter_alone(server: Any, reference: Reference) -> None:
    rng = random.Random(0)
    jobs = [(rng.choice(["alpha", "beta", "base"]), rng.choice(PROMPTS + ["<chat>"]), rng.randint(1, 12)) for _ in range(40)]
    steps0 = server.engine.steps
    submitted: list[tuple[tuple, Any]] = []

    def client(part: list) -> None:
        for job in part:
            time.sleep(rng.random() * 0.01)  # arrive while others run: joins between steps
            seqs, _ = submit(server, job[0], reference.ids(job[1]), max_tokens=job[2])
            submitted.append((job, seqs[0]))

    threads = [threading.Thread(target=client, args=(jobs[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    finish([s for _, s in submitted])
    for (model, prompt, max_tokens), seq in submitted:
        assert seq.tokens == reference.tokens(model, prompt, max_tokens), (model, prompt, max_tokens)
        assert seq.finish_reason in ("stop", "length")
    # they really shared forwards: far fewer steps than tokens, and multi-row steps happened
    tokens = sum(len(s.tokens) for _, s in submitted)
    assert server.engine.steps - steps0 < tokens * 0.7
    assert max(i for i, c in enumerate(server.metrics.batch_rows.counts) if c) >= 1  # some step had > 1 row


def test_new_request_joins_the_running_batch(server: Any, reference: Reference) -> None:
    long_seqs, _ = submit(server, "alpha", reference.ids(PROMPTS[2]), max_tokens=200)
    wait_until(lambda: len(long_seqs[0].tokens) >= 3, what="the long request to start")
    short, _ = submit(server, "beta", reference.ids(PROMPTS[0]), max_tokens=6)
    finish(short)
    # the short one came, ran and left while the long one kept going
    assert not long_seqs[0].done and short[0].t_start < time.perf_counter()
    assert short[0].tokens == reference.tokens("beta", PROMPTS[0], 6)
    finish(long_seqs)
    assert long_seqs[0].tokens == reference.tokens("alpha", PROMPTS[2], 200)


def test_seeded_sampling_is_reproducible_and_per_request(server: Any, reference: Reference) -> None:
    ids = reference.ids(PROMPTS[1])
    alone, _ = submit(server, "alpha", ids, max_tokens=10, temperature=1.0, seed=1234)
    finish(alone)
    crowd = [submit(server, m, ids, max_tokens=10, temperature=1.0, seed=s)[0][0]
             for m, s in (("alpha", 1234), ("beta", 1), ("alpha", 99), ("base", 1234), ("alpha", 1234))]
    finish(crowd)
    assert crowd[0].tokens == alone[0].tokens == crowd[4].tokens  # same seed, other companions
    assert crowd[2].tokens != alone[0].tokens  # another seed samples something else
    # a vanishing top_p keeps only the most likely token: greedy, whatever the temperature
    nucleus, _ = submit(server, "beta", ids, max_tokens=10, temperature=1.5, top_p=1e-6, seed=7)
    finish(nucleus)
    assert nucleus[0].tokens == reference.tokens("beta", PROMPTS[1], 10)
    # n choices of one prompt: seed, seed+1, ...
    many, _ = submit(server, "alpha", ids, max_tokens=10, temperature=1.0, seed=1234, n=3)
    finish(many)
    assert many[0].tokens == alone[0].tokens and len({tuple(s.tokens) for s in many}) == 3
    assert [s.index for s in many] == [0, 1, 2]


def test_stop_strings_cut_the_text_and_are_never_streamed(server: Any, reference: Reference) -> None:
    full = reference.text("beta", PROMPTS[2], 24)
    assert len(full) > 12
    stop = full[6:10]
    cut = full[:full.find(stop)]
    for stream in (False, True):
        seqs, c = submit(server, "beta", reference.ids(PROMPTS[2]), max_tokens=24, stop=(stop, "\u2603never"), stream=stream)
        finish(seqs)
        kind, gen = c.final()
        assert kind == "done" and gen.text == cut and gen.finish_reason == "stop"
        assert gen.completion_tokens < len(reference.tokens("beta", PROMPTS[2], 24))
        if stream:
            assert c.deltas() == cut


def test_streaming_deltas_add_up_to_the_text(server: Any, reference: Reference) -> None:
    seqs, c = submit(server, "alpha", reference.ids("<chat>"), max_tokens=12, stream=True)
    finish(seqs)
    kind, gen = c.final()
    assert c.deltas() == gen.text == reference.text("alpha", "<chat>", 12)
    assert sum(1 for k, _ in c.events[0] if k == "delta") > 2
    assert gen.finish_reason == "length" and gen.completion_tokens == 12


def test_eos_finishes_with_stop(server: Any, reference: Reference) -> None:
    want = reference.tokens("alpha", PROMPTS[0], 8)
    codec = server.codec("alpha")
    old = set(codec.eos)
    codec.eos = old | {want[3]}  # pretend the 4th token is an end-of-sequence token
    try:
        seqs, c = submit(server, "alpha", reference.ids(PROMPTS[0]), max_tokens=8)
        finish(seqs)
    finally:
        codec.eos = old
    assert seqs[0].finish_reason == "stop" and seqs[0].tokens == want[:want.index(want[3]) + 1]


def test_cancel_frees_the_slot(tiny_model_dir: Path, adapter_runs: dict[str, Path], reference: Reference) -> None:
    from tunesmith.serving.server import ModelServer

    with ModelServer.from_paths(tiny_model_dir, {"alpha": adapter_runs["alpha"]}, max_batch_size=2, max_wait_ms=0) as s:
        a, ca = submit(s, "alpha", reference.ids(PROMPTS[0]), max_tokens=400)
        b, cb = submit(s, "base", reference.ids(PROMPTS[1]), max_tokens=400)
        wait_until(lambda: len(a[0].tokens) > 2 and len(b[0].tokens) > 2, what="both running")
        c, cc = submit(s, "alpha", reference.ids(PROMPTS[3]), max_tokens=5)
        time.sleep(0.2)
        assert c[0].t_start is None and s.stats()["queued"] == 1  # the batch is full
        s.cancel(a[0])
        finish(c)
        assert c[0].tokens == reference.tokens("alpha", PROMPTS[3], 5)
        assert a[0].finish_reason == "cancelled" and not b[0].done
        assert ca.final()[1].finish_reason == "cancelled"
        s.cancel(b[0])
        wait_until(lambda: s.stats()["running"] == 0 and s.inflight() == 0, what="an empty batch")


def test_full_queue_is_refused_with_retry_after(tiny_model_dir: Path, reference: Reference) -> None:
    from tunesmith.serving.server import ModelServer

    with ModelServer.from_paths(tiny_model_dir, max_batch_size=1, max_queue=2, max_wait_ms=0) as s:
        running, _ = submit(s, "base", reference.ids(PROMPTS[0]), max_tokens=500)
        wait_until(lambda: len(running[0].tokens) > 0, what="a running request")
        waiting = [submit(s, "base", reference.ids(PROMPTS[1]), max_tokens=4)[0][0] for _ in range(2)]
        with pytest.raises(ServingError) as err:
            submit(s, "base", reference.ids(PROMPTS[1]), max_tokens=4)
        assert err.value.status == 429 and int(err.value.headers["Retry-After"]) >= 1
        assert s.inflight() == 3  # the refused one left no trace
        s.cancel(running[0])
        finish(waiting)
        assert all(w.tokens == reference.tokens("base", PROMPTS[1], 4) for w in waiting)


def test_limits_are_checked_before_queueing(server: Any, reference: Reference) -> None:
    with pytest.raises(ServingError) as err:
        submit(server, "alpha", reference.ids(PROMPTS[0]), max_tokens=server.max_tokens_limit + 1)
    assert err.value.code == "invalid_max_tokens"
    with pytest.raises(ServingError) as err:
        submit(server, "alpha", list(range(1, 500)), max_tokens=100)  # the tiny model's context is 512
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(ServingError) as err:
        submit(server, "nope", [1, 2], max_tokens=1)
    assert err.value.status == 404
    assert server.inflight() == 0


def test_serial_mode_gives_the_same_answers(tiny_model_dir: Path, adapter_runs: dict[str, Path], reference: Reference) -> None:
    from tunesmith.serving.server import ModelServer

    with ModelServer.from_paths(tiny_model_dir, {"alpha": adapter_runs["alpha"], "beta": adapter_runs["beta"]},
                                mode="serial") as s:
        jobs = [(m, p) for m in ("alpha", "beta", "base") for p in PROMPTS[:3]]
        seqs = [(job, submit(s, job[0], reference.ids(job[1]), max_tokens=6)[0][0]) for job in jobs]
        finish([q for _, q in seqs])
        for (m, p), q in seqs:
            assert q.tokens == reference.tokens(m, p, 6), (m, p)
        assert s.stats()["mode"] == "serial" and s.engine.max_batch_size == 1
