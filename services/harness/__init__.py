"""The harness: what runs experiments and demos around the learner and actors on one machine —
``fleetloop demo`` (robots and LLM), simulated fleets, offline bootstrap, evaluation, experiments,
reports, the live view, and machine facts for result files (:mod:`.machine`). It imports neither
:mod:`services.control` nor :mod:`services.cli`."""
