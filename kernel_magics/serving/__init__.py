"""The serving adapters: a Truss-compatible HTTP server (FastAPI + uvicorn) and Ray Serve replicas."""
