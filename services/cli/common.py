"""Defaults shared by the ``fleetloop`` subcommand modules."""

DEFAULT_TASKS = "reach-v3,push-v3,pick-place-v3,drawer-open-v3"
