"""How a Ray cluster for this project starts: a local multi-node cluster (`clusters.local`), the
job submission client behind `ray_job.py submit|status|logs|stop|list` (`clusters.jobs`), and
cluster definitions for the cloud (`aws.yaml`, `gcp.yaml`) and Kubernetes (`kuberay/`)."""
