"""The control plane: REST API (:mod:`.api`) and dashboard (``dashboard/``), Redis state (:mod:`.state`),
JobSpecs (:mod:`.jobspec`), access control, the REST client, ``fleetloop up`` (:mod:`.up`) and the
launchers (:mod:`.launchers`). It may use :mod:`services.harness` (bootstrap, evaluation, simulated
fleets); the harness never imports it."""
