"""Records <-> bytes: the Avro codec of the wire models, JSON fields with limits, dead-letter records."""
