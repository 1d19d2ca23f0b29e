"""vsup: a supervisor that keeps vLLM servers alive and their machines clean."""

__version__ = "0.1.0"
