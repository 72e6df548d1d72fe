"""Admission control: never admits a rollout that would train past eta (property test over random
interleavings), eta=0 is synchronous, expiry/cancel free capacity, counters add up."""

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop.errors import InvalidArgument
from learner.llm.admission import AdmissionConfig, AdmissionController


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Sim:
    """A learner that trains one step per ``batch_groups`` arrived groups (FIFO), bumping the version."""

    def __init__(self, eta: int, b: int, ttl: float = 10.0, rule: str = "oldest", max_in_flight=None) -> None:
        self.clock = Clock()
        self.ctl = AdmissionController(AdmissionConfig(eta=eta, batch_groups=b, ticket_ttl_s=ttl, rule=rule,
                                                       max_in_flight=max_in_flight), clock=self.clock)
        self.eta, self.b = eta, b
        self.version = 0
        self.flying: list = []   # tickets the actors are working on (the controller may have expired some)
        self.queue: deque = deque()
        self.trained: list[int] = []
        self.dropped_arrivals = 0

    def admit(self, n: int, actor: str = "a") -> int:
        got = self.ctl.admit(actor, n, self.version)
        assert all(t.version == self.version for t in got)
        self.flying.extend(got)
        return len(got)

    def arrive(self, i: int) -> None:
        if not self.flying:
            return
        t = self.flying.pop(i % len(self.flying))
        done = self.ctl.complete(t.id, t.actor_id)
        if done is None:
            self.dropped_arrivals += 1
        else:
            assert done == t
            self.queue.append(done)

    def train(self) -> bool:
        if len(self.queue) < self.b:
            return False
        for _ in range(self.b):
            t = self.queue.popleft()
            self.trained.append(self.version - t.version)
        self.version += 1
        return True

    def check_counts(self) -> None:
        s = self.ctl.stats()
        assert s["admitted"] == s["completed"] + s["cancelled"] + s["expired"] + s["in_flight"]
        assert s["live"] == s["admitted"] - s["cancelled"] - s["expired"]
        # live groups = consumed + queued + in flight (expired ones are not live)
        assert s["live"] == self.version * self.b + len(self.queue) + s["in_flight"]


OPS = st.lists(st.one_of(
    st.tuples(st.just("admit"), st.integers(0, 5)),
    st.tuples(st.just("arrive"), st.integers(0, 1000)),
    st.tuples(st.just("train"), st.just(0)),
    st.tuples(st.just("time"), st.integers(1, 6)),
    st.tuples(st.just("cancel"), st.integers(0, 1000)),
    st.tuples(st.just("rush"), st.integers(1, 3)),   # fast rollouts overtake the ones in flight
), max_size=200)


def rush(sim: "Sim", n: int) -> None:
    """Admit ``n``, let the newest tickets arrive at once, train while a batch is ready."""
    got = sim.admit(n)
    for _ in range(got):
        sim.arrive(len(sim.flying) - 1)
    while sim.train():
        pass


@settings(max_examples=300, deadline=None)
@given(eta=st.integers(0, 3), b=st.integers(1, 4), ops=OPS)
def test_never_trains_past_eta_any_interleaving(eta, b, ops):
    sim = Sim(eta, b, ttl=10.0)
    for op, arg in ops:
        if op == "admit":
            got = sim.admit(arg)
            assert got <= arg
        elif op == "arrive":
            sim.arrive(arg)
        elif op == "train":
            sim.train()
        elif op == "time":
            sim.clock.t += arg
            sim.ctl.expire()
        elif op == "cancel" and sim.flying:
            t = sim.flying.pop(arg % len(sim.flying))
            sim.ctl.cancel(t.id)
        elif op == "rush":
            rush(sim, arg)
        sim.check_counts()
        # no deadlock: with nothing in flight and less than a batch queued, someone can be admitted
        if sim.ctl.in_flight == 0 and len(sim.queue) < b:
            assert sim.ctl.capacity(sim.version) > 0
        if eta == 0:  # synchronous: at most one batch admitted-but-untrained
            assert len(sim.queue) + sim.ctl.in_flight <= b
    while sim.flying:  # drain: everything still in flight arrives, the learner trains what it can
        sim.arrive(0)
        while sim.train():
            pass
    assert all(0 <= s <= eta for s in sim.trained), sim.trained


@settings(max_examples=200, deadline=None)
@given(eta=st.integers(0, 3), b=st.integers(1, 4), ops=OPS)
def test_current_rule_bounds_in_order_arrivals(eta, b, ops):
    """AReaL's published rule (learner version only) is exact when groups arrive in admission order."""
    sim = Sim(eta, b, ttl=1e9, rule="current")
    for op, arg in ops:
        if op == "admit":
            sim.admit(arg)
        elif op == "arrive":
            sim.arrive(0)  # oldest first
        elif op == "train":
            sim.train()
        sim.check_counts()
    while sim.flying:
        sim.arrive(0)
        while sim.train():
            pass
    assert all(0 <= s <= eta for s in sim.trained)


def test_current_rule_is_violated_by_a_straggler_and_oldest_rule_is_not():
    def run(rule):
        sim = Sim(eta=1, b=1, ttl=1e9, rule=rule)
        sim.admit(2)                 # v0: straggler A and B
        a = sim.flying.pop(0)
        sim.arrive(0)                # B arrives, trained at v0
        sim.train()
        sim.admit(1)                 # v1: C (current rule only)
        sim.arrive(0)
        sim.train()
        sim.admit(1)                 # v2: D
        sim.arrive(0)
        sim.train()
        sim.flying.append(a)         # A finally arrives
        sim.arrive(len(sim.flying) - 1)
        while sim.train():
            pass
        return sim.trained
    assert max(run("current")) > 1      # AReaL's rule as published: A trained 3 versions stale
    assert max(run("oldest")) <= 1      # the straggler holds admissions back instead


def test_eta0_is_synchronous():
    sim = Sim(eta=0, b=3)
    assert sim.admit(10) == 3
    assert sim.admit(1) == 0
    assert sim.ctl.blocked_total == 8
    for _ in range(3):
        sim.arrive(0)
    assert sim.admit(1) == 0          # all arrived but not trained yet: still the same version's batch
    assert sim.train() and sim.version == 1
    assert sim.admit(5) == 3
    assert sim.trained == [0, 0, 0]


def test_capacity_formula_and_eta():
    sim = Sim(eta=2, b=4)
    assert sim.ctl.capacity(0) == 12        # (0 + 2 + 1) * 4
    assert sim.admit(20) == 12
    for _ in range(4):
        sim.arrive(0)
    sim.train()
    # oldest in-flight ticket is from v0: still (0 + 3) * 4 - 12 = 0, even at learner version 1
    assert sim.ctl.capacity(1) == 0
    for _ in range(8):
        sim.arrive(0)
    assert sim.ctl.capacity(1) == 4         # nothing in flight: (1 + 3) * 4 - 12
    relaxed = AdmissionController(AdmissionConfig(eta=2, batch_groups=4, rule="current"), clock=Clock())
    relaxed.admit("x", 12, 0)
    assert relaxed.capacity(1) == 4


def test_expired_tickets_free_capacity_and_are_unknown_on_arrival():
    sim = Sim(eta=0, b=2, ttl=5.0)
    assert sim.admit(2) == 2
    assert sim.admit(1) == 0
    assert sim.ctl.retry_after_ms(0) == 200
    sim.clock.t += 4.875
    assert sim.ctl.retry_after_ms(0) == 126  # the oldest ticket expires sooner than the default hint
    sim.clock.t += 0.125
    assert sim.ctl.capacity(0) == 2 and sim.ctl.in_flight == 0 and sim.ctl.expired_total == 2
    assert sim.ctl.retry_after_ms(0) == 0
    sim.arrive(0)                            # a late group of an expired ticket
    assert sim.dropped_arrivals == 1 and sim.ctl.unknown_total == 1
    assert sim.admit(3) == 2
    sim.check_counts()


def test_cancel_unknown_and_wrong_actor():
    sim = Sim(eta=1, b=2)
    t = sim.ctl.admit("a", 1, 0)[0]
    assert sim.ctl.complete("nope") is None
    assert sim.ctl.complete(t.id, actor_id="b") is None   # someone else's ticket: refused, stays in flight
    assert sim.ctl.in_flight == 1 and sim.ctl.unknown_total == 2
    assert sim.ctl.cancel(t.id) and not sim.ctl.cancel(t.id)
    assert sim.ctl.complete(t.id) is None
    s = sim.ctl.stats()
    assert (s["admitted"], s["cancelled"], s["completed"], s["in_flight"], s["unknown"]) == (1, 1, 0, 0, 3)
    assert s["oldest_in_flight_version"] == -1


def test_max_in_flight_and_bad_input():
    ctl = AdmissionController(AdmissionConfig(eta=5, batch_groups=10, max_in_flight=3), clock=Clock())
    assert len(ctl.admit("a", 10, 0)) == 3
    assert ctl.admit("a", 1, 0) == [] and ctl.stats()["blocked_requests"] == 1
    with pytest.raises(InvalidArgument, match="rollouts"):
        ctl.admit("a", -1, 0)
    with pytest.raises(InvalidArgument, match="learner_version"):
        ctl.admit("a", 1, -2)
    with pytest.raises(ValueError):
        AdmissionConfig(batch_groups=0)
    with pytest.raises(ValueError):
        AdmissionConfig(eta=-1)


def test_thread_safety_counts():
    import threading
    ctl = AdmissionController(AdmissionConfig(eta=1000, batch_groups=10, ticket_ttl_s=1e9))
    got: list = []
    lock = threading.Lock()

    def worker():
        for _ in range(200):
            ts = ctl.admit("w", 2, 0)
            for t in ts:
                assert ctl.complete(t.id) is not None
            with lock:
                got.extend(ts)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len({t.id for t in got}) == len(got) == ctl.admitted_total == ctl.completed_total
    assert len(got) <= (0 + 1000 + 1) * 10
