"""LLM post-training pieces of the learner (GRPO, admission-controlled staleness, LLM ingest and core)."""
