"""One retraining cycle: rounds, checkpoints and resume, the gate, publication, the run directory."""
