"""Pipeline stages, the station daemon and the MQTT publisher."""
