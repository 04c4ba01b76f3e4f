"""`python -m utils.study`: a whole empirical study (a grid of script runs, a table with bootstrap intervals,
figures and a verdict per claim) from one study file. See docs/study.md."""
