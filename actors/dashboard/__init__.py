"""The dashboard: a live page of a deployment, its status JSON, Grafana dashboards."""
