"""The shell over Kafka: the worker, its transactional writers, run tables, topics and records."""
