"""API: the run's HTTP service (status, Prometheus metrics, control, the live page).

Owns the FastAPI app, its token check and the service the CLI hands the controller (`app.serve_api`), the
Prometheus text (`metrics`), the uvicorn thread it runs in (`serving`) and the page (`web/`). It reads the run
through the pipeline's read-only `RunView` (the status document is `pipeline.status`) and posts commands to
its control queue; it never imports the controller.
"""
