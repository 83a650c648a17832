"""Which layers: targets by name, aliases and tied weights, silent layers, finding and replacing
submodules, refusals before anything runs."""
