"""Which ranks: rank policies, the allocation of a budget, the candidates' NMSE curves, the output
probe, the readiness signal, policies as plain data."""
