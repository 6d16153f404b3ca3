"""``memcom-experiment``: grids of methods x compression ratios x seeds, run as training subprocesses.

Sits beside ``launch/`` at the top of the dependency graph (it starts ``memcom_torchrec.train``
runs and reads their ``train.results.RunResult``); nothing in the package imports it.
"""
