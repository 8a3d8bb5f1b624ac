"""fedfsd: federated self-driving model training with vehicle-level differential privacy."""

__version__ = "0.1.0"
