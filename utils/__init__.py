"""Correct, tested implementations of what the course teaches (see CONTRIBUTING.md)."""
