"""The statistics: forward hooks streaming moments, held-out halves, passes under a memory budget, each
layer's statistics reduced to one owner process."""
