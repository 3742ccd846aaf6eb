"""What a site does in a round: train, evaluate, answer a repeated request without spending again."""
