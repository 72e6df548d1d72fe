"""Launchers: what starts and stops a job's learner and simulated fleet (:mod:`.base` has the
:class:`~.base.Launcher` interface). :mod:`.local` (Ray on this machine), :mod:`.hold` (starts nothing),
Kubernetes in :mod:`.k8s_settings`, :mod:`.k8s_manifests` (pure object builders) and
:mod:`.k8s_reconciler` (the API calls). Import the one you use; nothing is imported here."""
