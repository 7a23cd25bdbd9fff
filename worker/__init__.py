"""The service worker: a Celery app running `nba.sanitize(job_id)`, and the sweeper that re-enqueues lost jobs.

Importing this package imports neither torch nor CUDA: the task imports the library inside the worker child.
"""
