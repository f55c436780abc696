"""Real services the test suite starts on loopback (S3 via SeaweedFS, ...)."""
