"""fleetloop's robot client: what a robot integrator embeds in their own control loop to stream
experience to a fleetloop learner and receive verified, versioned policy weights.

Install on the robot (Python 3.10-3.13; needs only grpcio, protobuf, numpy and safetensors; torch and
an image library are extras)::

    make client-wheel                                   # in a fleetloop checkout: dist/fleetloop_client-*.whl
    pip install dist/fleetloop_client-*.whl             # + '[torch]' for torch tensors, '[images]' for JPEG/PNG

Quick start::

    from fleetloop.client import FleetClient, MlpPolicy, make_spec

    obs_specs = [make_spec("state", "float32", [6])]                    # the job's tensors, by name
    act_specs = [make_spec("action", "float32", [6], low=[-1] * 6, high=[1] * 6)]
    client = FleetClient("learner.example:50051", job_id="arm-pick", actor_id="arm-7", credential=token,
                         observation_specs=obs_specs, action_specs=act_specs, tasks=["pick"],
                         spool_dir="/var/lib/fleetloop/spool", tls_ca_file="ca.pem")
    run = client.connect()              # handshake; the fleet's current policy fetched and sha256-verified
    policy = MlpPolicy.from_weights(client.current, run, obs_specs)   # the default policy, numpy only
    while not client.job_stopping:
        if (new := client.swap_if_ready()) is not None:   # only between episodes
            policy = MlpPolicy.from_weights(new, run, obs_specs)
        ep = client.begin_episode("pick")                 # every step carries this policy version
        for t in range(run.max_episode_steps):
            obs = {"state": robot.joint_positions()}     # name -> array, as the specs say
            action, intervened = operator.action() or (policy.act(obs, "pick"), False)
            robot.move(action)
            ep.record(obs, action, reward=0.0, intervened=intervened)   # spooled to disk, sent in the background
        ep.end("success")                                 # or "failure", "timeout", "aborted"
    client.close()                      # flushes (bounded); whatever is unacknowledged stays in the spool

Contract (details in :mod:`fleetloop.client.runtime`): nothing blocks on the network (steps go to a
disk spool, a background sender ships them and resends after a reconnect or restart: exactly once
on the learner); weights are used only after their sha256 matched; a new version is taken only
between episodes. ``weights_format`` ("auto": torch tensors when torch is installed, else numpy
arrays) says what :attr:`VerifiedWeights.state_dict` holds; :meth:`VerifiedWeights.arrays` always
gives numpy. Errors are :class:`~fleetloop.errors.FleetloopError` subclasses naming the field.

Modules: ``runtime`` (:class:`FleetClient`), ``recorder`` (:class:`EpisodeRecorder`), ``spool``
(:class:`Spool`), ``sender`` (:class:`Sender`), ``weight_client`` (:class:`WeightClient`,
:class:`VerifiedWeights`), ``connection`` (:class:`LearnerConnection`, shared with the LLM
rollout actor), ``limits`` (the learner's message-size limit), ``mlp`` (:class:`MlpPolicy`: the job's default
MLP policy run with numpy, for robots without torch). Examples: ``examples/lerobot_robot_loop.py``,
``examples/ros2_node.py``.
"""

from __future__ import annotations

from fleetloop import __version__
from fleetloop.client.connection import ConnectionParts, LearnerConnection, error_from_rpc
from fleetloop.client.mlp import MlpPolicy
from fleetloop.client.recorder import EpisodeRecorder
from fleetloop.client.runtime import ClientMetrics, FleetClient, close_interrupted_episodes
from fleetloop.client.sender import Sender
from fleetloop.client.spool import Spool, SpoolEntry
from fleetloop.client.weight_client import VerifiedWeights, WeightClient
from fleetloop.codec import make_spec
from fleetloop.errors import FleetloopError, IntegrityError, InvalidArgument, Unavailable

__all__ = ["ClientMetrics", "ConnectionParts", "EpisodeRecorder", "FleetClient", "FleetloopError", "IntegrityError",
           "InvalidArgument", "LearnerConnection", "MlpPolicy", "Sender", "Spool", "SpoolEntry", "Unavailable", "VerifiedWeights",
           "WeightClient", "__version__", "close_interrupted_episodes", "error_from_rpc", "make_spec"]
