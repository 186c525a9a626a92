"""The trial side: data, models, neural-collapse metrics and the training loop. Never imports Ray or sweeper."""
