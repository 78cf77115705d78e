"""Deployment assets (Prometheus, Grafana) and the code that builds and reads them."""
