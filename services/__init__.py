"""fleetloop services: the composition root (CLI, local launcher, demo orchestration) and, later,
the control plane (REST API, dashboard, Redis state). The only package that wires ``actor`` and
``learner`` together; neither of those imports it."""
