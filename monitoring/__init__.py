"""Prometheus metrics, A/B statistics, dashboards and alert sources."""
