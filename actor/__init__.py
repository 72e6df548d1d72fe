"""fleetloop actor: the stateless robot / simulator side of the fleet.

It runs the current policy on a robot or simulator, lets an operator take over (HG-DAgger),
streams on-policy and intervention experience to the learner, and swaps verified weights at
episode boundaries. It imports only the shared ``fleetloop`` package, never ``learner`` or
``services``.
"""
