"""Background work with progress the UI can poll and scripts can read."""
