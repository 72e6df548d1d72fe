"""fleetloop's shared contract package.

Actors (`actor/`), the learner (`learner/`) and the control plane (`services/`) never import each
other; they share only this package:

- ``fleetloop.v1``: Python generated from ``proto/fleetloop/v1/*.proto`` by the install step
  (``make proto``); never edited by hand, never committed.
- ``fleetloop.codec``: tensors <-> numpy, spec checks, protocol version.
- ``fleetloop.errors``: the one error hierarchy, mapped to gRPC / HTTP status only at boundaries.
- ``fleetloop.policies``: policy architecture plug-ins (factories named in the job config).
- ``fleetloop.dataset``: the on-disk offline demonstration format.
- ``fleetloop.weights``: safetensors blobs and their sha256 digests (no torch; torch tensors through
  ``fleetloop.weights_torch``, imported on demand).
- ``fleetloop.client``: the robot client library (``FleetClient``), also built alone as the
  ``fleetloop-client`` wheel (``client/``): it and the modules it imports must not need torch.
- ``fleetloop.logs``: structured one-line-per-event logging.
"""

__version__ = "0.1.0"
