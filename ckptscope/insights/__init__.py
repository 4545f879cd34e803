"""Insights: answers computed from a checkpoint's listing and statistics (pure logic, no FastAPI)."""
