"""Prometheus metrics, the loop-wide gauges read from the database, dashboards and alert rules."""
