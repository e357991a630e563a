"""Improve: trainer, losses, threshold schedules, record selection, value network, batches."""
