"""API: the run's HTTP service (status, Prometheus metrics, control, the live page).

Owns the FastAPI app and its token check (`app`), the status document (`status`), the Prometheus text
(`metrics`), the uvicorn thread it runs in (`serving`) and the page (`web/`). It reads the run through the
pipeline's read-only view and posts commands to its control queue; it never changes the controller itself.
"""
