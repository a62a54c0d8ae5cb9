"""`surgun bench`: SurgUn, its ablations and the baselines on the toy world, in one table (run.py, methods.py)."""
