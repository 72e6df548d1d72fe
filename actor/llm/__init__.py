"""LLM rollout servers as actors: a vLLM engine the actor drives (``engine``), with live weight
updates and a version tag on every completion. See docs/LLM_ENGINE.md."""
