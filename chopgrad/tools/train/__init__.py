"""`chopgrad train`: one-step latent models trained with pixel losses through chopgrad."""
