"""Sources and sinks: files and object stores by URI, in-memory data, Kafka later."""
