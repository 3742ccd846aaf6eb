"""fedretrain: federated DP-LoRA retraining of generative models.

The core package holds what sites and the coordinator share: typed config,
data schema, model loading, adapters, privacy accounting and the training loop.
It knows nothing of Flower messages or of argv; the edges (client/, server/,
strategies/, simulation/, cli/) translate to and from it.
"""

__version__ = "0.1.0"
