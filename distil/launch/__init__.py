"""Where a run runs: on Ray Train workers (the driver's sequence), and on Kubernetes with KubeRay (`distil k8s`)."""
