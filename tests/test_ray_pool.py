"""The Ray executor's dispatch (``_Pool.run``) with results arriving in any order: every batch
comes back once and in batch order, no replica ever holds more than ``AHEAD`` batches, and
replicas that come up late join in. A stand-in for the four calls of Ray's API the pool
makes (``remote``, ``wait``, ``get``, ``kill``) finishes whatever work it picks, so orders
a real cluster produces only by chance are tried on every run; the real cluster runs in
tests/test_ray.py and tests/test_ray_nodes.py."""

from __future__ import annotations

import random
from typing import Any, List

from hypothesis import given, settings, strategies as st

from regioncap.executors.ray_executor import AHEAD, _Pool


class Ref:
    def __init__(self, value: Any, actor: "Actor", kind: str) -> None:
        self.value, self.actor, self.kind = value, actor, kind


class Method:
    def __init__(self, actor: "Actor", name: str) -> None:
        self.actor, self.name = actor, name

    def remote(self, *args: Any) -> Ref:
        return self.actor.call(self.name, *args)


class Actor:
    def __init__(self, ray: "FakeRay", k: int) -> None:
        self.ray, self.k = ray, k
        self.where, self.caption = Method(self, "where"), Method(self, "caption")
        self.queued = 0
        self.up = False
        self.killed = False

    def call(self, name: str, *args: Any) -> Ref:
        if name == "where":
            ref = Ref({"node_id": f"node{self.k % 2}-{'x' * 12}", "host": "h", "pid": 100 + self.k}, self, "where")
        else:
            assert self.up, "a batch went to a replica that was not up"
            self.queued += 1
            assert self.queued <= AHEAD, "more than AHEAD batches on one replica"
            offsets, lengths = args
            ref = Ref({"records": [{"index": o} for o in offsets]}, self, "caption")
            self.ray.sent.append((self.k, list(offsets)))
        self.ray.out.append(ref)
        return ref


class ActorClass:
    def __init__(self, ray: "FakeRay") -> None:
        self.ray = ray

    def remote(self, **init: Any) -> Actor:
        actor = Actor(self.ray, len(self.ray.actors))
        self.ray.actors.append(actor)
        return actor


class FakeRay:
    """Finishes a random one of the refs it is waited on (replicas come up in random order too)."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.actors: List[Actor] = []
        self.out: List[Ref] = []
        self.sent: List[Any] = []
        self.done: set = set()

    def wait(self, refs: List[Ref], num_returns: int = 1):
        assert refs, "waited on nothing: the pool would hang"
        ref = self.rnd.choice(refs)
        self.done.add(id(ref))
        return [ref], [r for r in refs if r is not ref]

    def get(self, ref: Ref) -> Any:
        if ref.kind == "where":
            ref.actor.up = True
        elif id(ref) not in self.done:
            raise AssertionError("get on a batch not finished: the pool would block on one replica")
        else:
            ref.actor.queued -= 1
        return ref.value

    def kill(self, actor: Actor, no_restart: bool = True) -> None:
        actor.killed = True


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10 ** 6), replicas=st.integers(1, 4), chunks=st.integers(0, 25),
       wait_all=st.booleans())
def test_every_batch_once_in_order_at_most_ahead_per_replica(seed, replicas, chunks, wait_all):
    ray = FakeRay(seed)
    pool = _Pool(ray, ActorClass(ray), replicas, {"cfg": {}})
    batches = [[(n * 3 + i, n * 3 + i, 1) for i in range(3)] for n in range(chunks)]
    got = []
    for result in pool.run(batches, wait_all=wait_all):
        got += [r["index"] for r in result["records"]]
        # Results wait in the pool until their turn, but never more than a window's worth are out.
        assert len(ray.sent) - len(got) // 3 <= 2 * AHEAD * replicas
    assert got == list(range(chunks * 3))
    assert sorted(o for _, offsets in ray.sent for o in offsets) == got  # each batch sent once
    where = pool.where()
    assert sum(r["rows"] for r in where) == chunks * 3 and sum(r["batches"] for r in where) == chunks
    if wait_all:  # every replica was up before the first batch: the first ones spread over all of them
        assert {k for k, _ in ray.sent[:replicas]} == set(range(min(replicas, chunks)))
    pool.close()
    assert all(a.killed for a in ray.actors)

