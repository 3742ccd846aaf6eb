"""Deploying fedretrain on Flower's deployment engine: identities, keys and process set-up."""
