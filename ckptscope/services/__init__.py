"""Use cases shared by the CLI, the REST API and the web UI."""
