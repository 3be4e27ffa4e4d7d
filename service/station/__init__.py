"""The station daemon: threads and queues around the analysis, specimen runs, commands, systemd."""
