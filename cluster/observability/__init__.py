"""Observability as code: Prometheus rules, PodMonitors and Grafana dashboards of kvferry.

Everything here is generated from ``cluster.metrics.CATALOG`` and Ray Serve's own metrics,
and written to ``k8s/`` by the CLI (``kvferry k8s render``, ``kvferry dashboards export``);
tests keep the committed files in step and run every query on a real Prometheus.
"""
