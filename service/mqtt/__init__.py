"""Messaging: the durable outbox, the MQTT publisher (the only code that talks MQTT), commands."""
