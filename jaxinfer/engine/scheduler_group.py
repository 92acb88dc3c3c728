"""Several schedulers over one block manager: the batches a pipeline keeps in flight."""

from __future__ import annotations

from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.sequence import Sequence


class SchedulerGroup:
    """One scheduler per batch in flight, all sharing one block manager (vLLM's "virtual engines").

    Under pipeline parallelism the engine keeps several independent batches moving through the
    stages: while batch b is in stage s + 1, batch b + 1 is in stage s, and each batch is sampled
    and rescheduled on its own as soon as its step comes back. Each batch is an ordinary
    `Scheduler`'s; a new request joins the least loaded one and stays there. One scheduler in the
    group is the plain engine.
    """

    def __init__(self, schedulers: list[Scheduler]) -> None:
        if not schedulers:
            raise ValueError("a scheduler group needs at least one scheduler")
        self.schedulers = schedulers

    def __len__(self) -> int:
        return len(self.schedulers)

    def __getitem__(self, index: int) -> Scheduler:
        return self.schedulers[index]

    def add(self, seq: Sequence, forks: list[Sequence] | tuple[Sequence, ...] = ()) -> int:
        """Queue a request (its samples stay together); -> the index of the batch it joined."""
        loads = [s.num_unfinished for s in self.schedulers]
        index = loads.index(min(loads))
        self.schedulers[index].add(seq, forks)
        return index

    def abort(self, seq_id: int) -> Sequence | None:
        for scheduler in self.schedulers:
            seq = scheduler.abort(seq_id)
            if seq is not None:
                return seq
        return None

    @property
    def has_unfinished(self) -> bool:
        return any(s.has_unfinished for s in self.schedulers)

    @property
    def num_waiting(self) -> int:
        return sum(s.num_waiting for s in self.schedulers)

    @property
    def num_running(self) -> int:
        return sum(s.num_running for s in self.schedulers)

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.schedulers)
