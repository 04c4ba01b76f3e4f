"""Follower tables for common-sense verification (test_greedyS_commonsense.py): build one over a corpus, load
the original's text format or the tensor format (`table`), and the runs and side-by-side table of the script
(`runs`). `python -m utils.commonsense build|inspect`."""
