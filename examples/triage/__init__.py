"""Support-ticket triage: classify, extract and read sentiment in parallel, decide, then act."""
