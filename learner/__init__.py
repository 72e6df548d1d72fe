"""fleetloop's central learner.

Pure core (no I/O, no networking, no Ray; unit-tested in ``tests/unit``):

- :mod:`learner.batch`: the :class:`~learner.batch.Batch` of torch tensors an algorithm trains on.
- :mod:`learner.replay`: :class:`~learner.replay.ReplayStore`, per-task online (FIFO ring) and
  offline (demonstration) buffers with an O(1) intervention index.
- :mod:`learner.sampler`: :class:`~learner.sampler.AdaptiveSampler`, SOP's per-task adaptive
  online/offline mix with uniform task weights.
- :mod:`learner.staleness`: :class:`~learner.staleness.StalenessGate`, the staleness bound and what
  happens past it (drop, down-weight, admit expert labels), at ingest and at training time.
- :mod:`learner.algorithms`: the pure :class:`~learner.algorithms.base.Algorithm` plug-in interface,
  its registry, and HG-DAgger.

The shell around it (gRPC ingest, weight store, Ray actor, checkpoints, metrics) lives in the other
modules of this package and wires these together.
"""
