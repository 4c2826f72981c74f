"""Deployment files (KubeRay, cluster launcher, Docker, Prometheus, Grafana) and their checks:
`python -m deploy.validate FILE...` for KubeRay manifests."""
