"""Kafka plumbing every part of calmrun shares: topic names and creation, clients, reading to the end."""
