"""fleetloop actor: the simulated-robot side of the fleet, a harness on the robot client.

It runs the current policy (torch, :mod:`actor.policy_runner`) on a simulator (Meta-World), lets an
operator take over (HG-DAgger), and streams on-policy and intervention experience to the learner
through :mod:`fleetloop.client` (the robot client library: spool, sender, recorder, verified weight
follower), which swaps weights at episode boundaries; also demos, evaluation and the LLM rollout
actor. It imports only the shared ``fleetloop`` package, never ``learner`` or ``services``.
"""
