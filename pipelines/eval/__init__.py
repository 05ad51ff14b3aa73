"""Closed-loop evaluation: policies behind one interface, the rollout loop, seeds and success statistics."""
