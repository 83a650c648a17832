"""Lightning integration: the callback decides when and where; the CLI runs YAML experiments."""
