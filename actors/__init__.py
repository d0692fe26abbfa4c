"""Generation workers (Ray actors)."""
