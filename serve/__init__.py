"""Ray Serve: student deployments, the solving-loop ingress, serve config and a client."""
