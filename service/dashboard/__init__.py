"""The clinic dashboard: a static page (no build step) that subscribes to the stations' topics
over MQTT over WebSockets, and the small HTTP server that serves it (`smearscope dashboard`)."""
