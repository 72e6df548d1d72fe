"""Algorithm plug-ins: pure maths, ``theta <- G(theta, batch)`` (no I/O).

``ALGORITHMS`` maps a job's ``algorithm`` name to its class; :func:`make_algorithm` builds one from
the job's ``algorithm_params`` (InvalidArgument naming the field on bad input). Importing this
package registers every built-in algorithm.
"""

from learner.algorithms.base import ALGORITHMS, Algorithm, UpdateResult, make_algorithm, register
from learner.algorithms.hg_dagger import HGDagger, HGDaggerConfig
from learner.algorithms.recap import RecapAlgorithm, RecapConfig
from learner.llm import grpo as _grpo  # noqa: F401,E402  (registers "grpo"; torch/numpy/pydantic only)

__all__ = ["ALGORITHMS", "Algorithm", "UpdateResult", "make_algorithm", "register", "HGDagger", "HGDaggerConfig",
           "RecapAlgorithm", "RecapConfig"]
