"""Physical operators over Arrow record batches, shared by the batch and streaming schedulers."""
