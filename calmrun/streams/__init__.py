"""Stream processing on Kafka (faust-streaming): apps, agents and tables of the calmrun runtime."""
