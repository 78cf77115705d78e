"""Grafana: provisioning files, and the dashboards built as code by `build_dashboards`."""
