"""Rollout: the version registry, experiments and canaries, their outcomes, the sequential
statistics and guardrails that promote or roll back, reports, and the `adapters` and `ab` CLIs."""
