"""Conversation log, ratings, PII redaction and dataset export (the loop's memory)."""
