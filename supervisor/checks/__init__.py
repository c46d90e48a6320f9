"""Health checks: probe implementations, per-service probe scheduling, dependency readiness."""
