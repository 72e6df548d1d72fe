"""Process-level chaos tests: real learner, actor and Redis processes killed with SIGKILL by pid."""
