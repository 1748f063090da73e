"""ServerApp: guarded weighted FedAvg, per-round checkpoints and metrics."""
