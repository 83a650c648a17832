"""Speed: the per-layer guard, the whole-model decision and the paired timings both decide from."""
