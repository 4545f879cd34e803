"""HTTP plumbing that both faces (the JSON API and the web UI) use: dependencies, uploads,
problem details, auth and the service routes."""
