"""fleetloop services: the composition root, by role. :mod:`services.cli` (the ``fleetloop``
command) > :mod:`services.control` (REST API, dashboard, Redis state, launchers) >
:mod:`services.harness` (demos, simulated fleets, bootstrap, evaluation, experiments, reports); each
imports only the ones after it (import-linter's layers contract). The only package that wires
``actor`` and ``learner`` together; neither of those imports it, and it never imports ``bench``."""
