"""Reports: per-layer reports and tables, advice about likely mistakes, naming the layer a failing
forward died in."""
