"""The core every package builds on: settings, shared names, domain errors and the root CLI.

Everything here but `loopchat.cli` imports nothing of the project (checked by `make lint`).
"""
