"""TaD-Eval service layer: settings, results DB, job planning, Celery workers and the `tad` CLI."""
